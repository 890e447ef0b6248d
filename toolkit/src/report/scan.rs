//! The `audit scan` document: one verdict per detector, rendered as a terminal table, JSON,
//! Markdown or a self-contained HTML page (same provenance fields as the defense reports).

use std::path::Path;

use anyhow::Result;
use comfy_table::{presets::UTF8_FULL_CONDENSED, Table};
use minijinja::{context, Environment};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{md_escape, one_line, Format, ModelInfo, SCHEMA_VERSION};

const TEMPLATE: &str = include_str!("scan.html");

/// One detector's answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Finding {
    pub detector: String,
    pub version: String,
    pub params: Value,
    pub library: String,
    pub library_sha256: String,
    /// `ok` or `failed`.
    pub status: String,
    pub error: Option<String>,
    /// Whether the detector flags the model (absent when it failed).
    pub backdoored: Option<bool>,
    pub target_classes: Vec<i64>,
    /// The detector's own score (p-value, anomaly index, ...) and its name.
    pub score: Option<f64>,
    pub score_name: Option<String>,
    /// model, sample or input.
    pub level: Option<String>,
    pub summary: Option<String>,
    /// Samples it flags (indices into the training split), when it names any.
    pub n_suspicious: usize,
    /// Those indices (sample- and input-level detectors).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub suspicious: Vec<i64>,
    /// The flagged samples against the data's `poison_idx`, when it has one and the detector
    /// judged training samples: `{found, poisoned, precision, recall}` (nothing flagged is recall
    /// 0, every poisoned sample missed, and precision null).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vs_poison_idx: Option<Value>,
    /// `scan --eval-attack`: an input-level detector run again on held-out clean test images and
    /// the same images triggered by the attack: `{attack, params, n_clean, n_triggered,
    /// flagged_clean, flagged_triggered, frr, far, seconds}` (FRR: clean inputs rejected; FAR:
    /// triggered inputs accepted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_eval: Option<Value>,
    pub seconds: f64,
    /// The plugin's own report, untouched.
    pub report: Value,
}

/// One detector's verdict, condensed for a row of a defense report.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DetectorVerdict {
    pub detector: String,
    /// `ok` or `failed`.
    pub status: String,
    pub backdoored: Option<bool>,
    pub target_classes: Vec<i64>,
    pub score: Option<f64>,
    pub score_name: Option<String>,
}

/// The verdict of a scan on one model, as a defense report's row carries it (`--verify`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ScanVerdict {
    /// Whether any detector flagged the model.
    pub flagged: bool,
    pub detectors: Vec<DetectorVerdict>,
}

impl ScanVerdict {
    pub fn of(findings: &[Finding]) -> ScanVerdict {
        ScanVerdict {
            flagged: findings.iter().any(|f| f.backdoored == Some(true)),
            detectors: findings
                .iter()
                .map(|f| DetectorVerdict {
                    detector: f.detector.clone(),
                    status: f.status.clone(),
                    backdoored: f.backdoored,
                    target_classes: f.target_classes.clone(),
                    score: f.score,
                    score_name: f.score_name.clone(),
                })
                .collect(),
        }
    }

    /// `FLAGGED (mmbd: 0)`, `not flagged (mmbd, nc)`, with `; failed: nc` when one failed.
    pub fn text(&self) -> String {
        let names = |keep: &dyn Fn(&DetectorVerdict) -> bool| -> Vec<&DetectorVerdict> {
            self.detectors.iter().filter(|d| keep(d)).collect()
        };
        let failed = names(&|d| d.status != "ok");
        let mut s = if self.flagged {
            let by: Vec<String> = names(&|d| d.backdoored == Some(true))
                .iter()
                .map(|d| {
                    let t: Vec<String> = d.target_classes.iter().map(i64::to_string).collect();
                    if t.is_empty() {
                        d.detector.clone()
                    } else {
                        format!("{}: {}", d.detector, t.join(" "))
                    }
                })
                .collect();
            format!("FLAGGED ({})", by.join(", "))
        } else {
            let ran: Vec<&str> = names(&|d| d.status == "ok")
                .iter()
                .map(|d| d.detector.as_str())
                .collect();
            format!(
                "not flagged ({})",
                if ran.is_empty() {
                    "-".to_string()
                } else {
                    ran.join(", ")
                }
            )
        };
        if !failed.is_empty() {
            let f: Vec<&str> = failed.iter().map(|d| d.detector.as_str()).collect();
            s += &format!("; failed: {}", f.join(", "));
        }
        s
    }
}

/// A scan document (`schema_version` as the defense reports).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ScanReport {
    pub schema_version: u32,
    /// Always `scan`.
    pub command: String,
    pub toolkit_version: String,
    pub created: String,
    pub model: ModelInfo,
    /// The data the detectors saw (`null`: none, only data-free detectors ran).
    pub data: Option<String>,
    pub seed: u64,
    pub device: String,
    pub findings: Vec<Finding>,
    /// Whether any detector flagged the model (the exit code is 3 then).
    pub flagged: bool,
}

impl ScanReport {
    pub fn new(model: ModelInfo, data: Option<String>, seed: u64, device: &str, findings: Vec<Finding>) -> ScanReport {
        let flagged = findings.iter().any(|f| f.backdoored == Some(true));
        ScanReport {
            schema_version: SCHEMA_VERSION,
            command: "scan".into(),
            toolkit_version: env!("CARGO_PKG_VERSION").into(),
            created: super::now_rfc3339(),
            model,
            data,
            seed,
            device: device.into(),
            findings,
            flagged,
        }
    }

    /// Renders in the format `path`'s extension names.
    pub fn render(&self, path: &Path) -> Result<String> {
        Ok(match Format::of(path)? {
            Format::Json => serde_json::to_string_pretty(self)? + "\n",
            Format::Markdown => self.markdown(),
            Format::Html => self.html()?,
        })
    }

    fn rows(&self) -> Vec<[String; 7]> {
        self.findings
            .iter()
            .map(|f| {
                let verdict = match (f.status.as_str(), f.backdoored) {
                    ("ok", Some(true)) => "FLAGGED".to_string(),
                    ("ok", _) => "not flagged".to_string(),
                    _ => format!("failed: {}", one_line(f.error.as_deref().unwrap_or(""), 120)),
                };
                let targets = if f.target_classes.is_empty() {
                    "-".to_string()
                } else {
                    f.target_classes
                        .iter()
                        .map(i64::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                let score = match (&f.score_name, f.score) {
                    (Some(n), Some(s)) => format!("{n} {s:.3e}"),
                    (None, Some(s)) => format!("{s:.4}"),
                    _ => "-".to_string(),
                };
                let samples = match (f.n_suspicious, &f.vs_poison_idx) {
                    (n, Some(pr)) => {
                        let ratio = |k: &str| pr[k].as_f64().map_or("-".to_string(), |v| format!("{v:.3}"));
                        format!("{n} (precision {}, recall {})", ratio("precision"), ratio("recall"))
                    }
                    (0, None) => "-".to_string(),
                    (n, None) => n.to_string(),
                };
                let samples = match &f.input_eval {
                    Some(e) => {
                        let ratio = |k: &str| e[k].as_f64().map_or("-".to_string(), |v| format!("{v:.3}"));
                        format!(
                            "{samples}; on {} clean and {} `{}`-triggered test inputs: FRR {}, FAR {}",
                            e["n_clean"],
                            e["n_triggered"],
                            e["attack"].as_str().unwrap_or("-"),
                            ratio("frr"),
                            ratio("far")
                        )
                    }
                    None => samples,
                };
                [
                    f.detector.clone(),
                    f.level.clone().unwrap_or_else(|| "-".into()),
                    verdict,
                    targets,
                    samples,
                    score,
                    format!("{:.1}", f.seconds),
                ]
            })
            .collect()
    }

    /// The terminal table.
    pub fn table(&self) -> String {
        let mut t = Table::new();
        t.load_preset(UTF8_FULL_CONDENSED);
        t.set_header(HEADER);
        for r in self.rows() {
            t.add_row(r);
        }
        t.to_string()
    }

    fn verdict_line(&self) -> String {
        let ran = self.findings.iter().filter(|f| f.status == "ok").count();
        if self.flagged {
            let by: Vec<&str> = self
                .findings
                .iter()
                .filter(|f| f.backdoored == Some(true))
                .map(|f| f.detector.as_str())
                .collect();
            format!(
                "FLAGGED as backdoored by {} of {ran} detector(s): {}",
                by.len(),
                by.join(", ")
            )
        } else {
            format!("not flagged by any of {ran} detector(s) that ran")
        }
    }

    fn markdown(&self) -> String {
        let mut s = format!(
            "# audit scan report\n\n- model: `{}` (sha256 {})\n- data: {}\n- toolkit {}, created {}, device {}, seed {}\n\n**{}**\n\n| {} |\n|{}\n",
            md_escape(&self.model.path),
            self.model.sha256,
            md_escape(self.data.as_deref().unwrap_or("none (data-free detectors only)")),
            self.toolkit_version,
            self.created,
            self.device,
            self.seed,
            self.verdict_line(),
            HEADER.join(" | "),
            "---|".repeat(HEADER.len())
        );
        for r in self.rows() {
            s += &format!(
                "| {} |\n",
                r.iter().map(|c| md_escape(c)).collect::<Vec<_>>().join(" | ")
            );
        }
        for f in &self.findings {
            s += &format!(
                "\n## {} {}\n\n{}\n\n- library: `{}` (sha256 {})\n- parameters: `{}`\n",
                md_escape(&f.detector),
                md_escape(&f.version),
                md_escape(f.summary.as_deref().or(f.error.as_deref()).unwrap_or("")),
                md_escape(&f.library),
                f.library_sha256,
                md_escape(&f.params.to_string())
            );
        }
        s
    }

    fn html(&self) -> Result<String> {
        #[derive(Serialize)]
        struct Detail<'a> {
            detector: &'a str,
            version: &'a str,
            summary: &'a str,
            library: &'a str,
            library_sha256: &'a str,
            params: String,
            report: String,
            images: Vec<(String, String)>,
        }
        let details: Vec<Detail> = self
            .findings
            .iter()
            .map(|f| Detail {
                detector: &f.detector,
                version: &f.version,
                summary: f.summary.as_deref().or(f.error.as_deref()).unwrap_or(""),
                library: &f.library,
                library_sha256: &f.library_sha256,
                params: serde_json::to_string_pretty(&f.params).unwrap_or_default(),
                report: serde_json::to_string_pretty(&f.report).unwrap_or_default(),
                images: report_images(&f.report),
            })
            .collect();
        let mut env = Environment::new();
        env.add_template("style.html", super::html::STYLE)?;
        env.add_template("scan.html", TEMPLATE)?;
        Ok(env.get_template("scan.html")?.render(context! {
            title => format!("audit scan report: {}", self.model.path),
            model => &self.model,
            data => self.data.as_deref().unwrap_or("none (data-free detectors only)"),
            toolkit_version => &self.toolkit_version,
            created => &self.created,
            device => &self.device,
            seed => self.seed,
            flagged => self.flagged,
            verdict => self.verdict_line(),
            header => HEADER,
            rows => self.rows(),
            details => details,
        })?)
    }
}

/// The images a detector's report carries by the host's convention: `images`, an array of
/// `{"caption": text, "png_base64": PNG in standard base64}` (Neural Cleanse's masks and
/// triggers). Only entries whose data is base64 text that opens with the PNG signature are kept
/// (the HTML page inlines them as `data:image/png` URIs; anything else is left to the JSON).
pub fn report_images(report: &Value) -> Vec<(String, String)> {
    const PNG_SIGNATURE_B64: &str = "iVBORw0KGgo";
    let Some(list) = report.get("images").and_then(Value::as_array) else {
        return vec![];
    };
    list.iter()
        .filter_map(|im| {
            let data = im.get("png_base64")?.as_str()?;
            let base64 = data
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/' || b == b'=');
            if !(base64 && data.starts_with(PNG_SIGNATURE_B64)) {
                return None;
            }
            let caption = im.get("caption").and_then(Value::as_str).unwrap_or("").to_string();
            Some((caption, data.to_string()))
        })
        .collect()
}

const HEADER: [&str; 7] = [
    "detector",
    "level",
    "verdict",
    "target classes",
    "flagged samples",
    "score",
    "seconds",
];

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(name: &str, flagged: bool) -> ScanReport {
        let f = Finding {
            detector: name.into(),
            version: "0.1.0".into(),
            params: serde_json::json!({"alpha": 0.05}),
            library: "/x/lib.so".into(),
            library_sha256: "ab".into(),
            status: "ok".into(),
            error: None,
            backdoored: Some(flagged),
            target_classes: if flagged { vec![0] } else { vec![] },
            score: Some(1e-4),
            score_name: Some("p_value".into()),
            level: Some("model".into()),
            summary: Some("largest margin".into()),
            n_suspicious: 0,
            suspicious: vec![],
            vs_poison_idx: None,
            input_eval: None,
            seconds: 1.5,
            report: serde_json::json!({}),
        };
        ScanReport::new(
            ModelInfo {
                path: "m<x>.onnx".into(),
                sha256: "cd".into(),
            },
            None,
            0,
            "cpu",
            vec![f],
        )
    }

    #[test]
    fn every_format_renders_the_verdict_escaped() {
        let r = sample("<mmbd>", true);
        assert!(r.flagged);
        let html = r.render(Path::new("x.html")).unwrap();
        assert!(html.contains("&lt;mmbd&gt;") && !html.contains("<mmbd>"), "escaped");
        assert!(!html.contains("<img"), "no images in the report: none shown");
        assert!(html.contains("FLAGGED") && !html.contains("<script") && !html.contains("http"));
        let md = r.render(Path::new("x.md")).unwrap();
        assert!(
            md.contains("FLAGGED as backdoored by 1 of 1") && md.contains("| 0 |"),
            "{md}"
        );
        let back: ScanReport = serde_json::from_str(&r.render(Path::new("x.json")).unwrap()).unwrap();
        assert_eq!(back, r);
        assert!(!sample("mmbd", false).flagged);
        // A sample-level finding shows its flagged samples against poison_idx.
        let mut r = sample("ss", true);
        r.findings[0].level = Some("sample".into());
        r.findings[0].n_suspicious = 3;
        r.findings[0].suspicious = vec![4, 5, 6];
        r.findings[0].vs_poison_idx = Some(serde_json::json!({"precision": 2.0 / 3.0, "recall": null}));
        let md = r.render(Path::new("x.md")).unwrap();
        assert!(md.contains("| 3 (precision 0.667, recall -) |"), "{md}");
        let back: ScanReport = serde_json::from_str(&r.render(Path::new("x.json")).unwrap()).unwrap();
        assert_eq!(back.findings[0].suspicious, vec![4, 5, 6]);
        // Images by the `images` convention are inlined; anything not a base64 PNG is dropped.
        let mut r = sample("nc", true);
        let png = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAAAAAA6fptVAAAACklEQVR4nGNgAAAAAgABSK+kcQAAAABJRU5ErkJggg==";
        r.findings[0].report = serde_json::json!({"images": [
            {"caption": "class 0: <mask>", "png_base64": png},
            {"caption": "bad", "png_base64": "iVBORw0KGgo\" onerror=\"x"},
            {"caption": "not png", "png_base64": "R0lGODlh"},
        ]});
        assert_eq!(report_images(&r.findings[0].report).len(), 1);
        let html = r.render(Path::new("x.html")).unwrap();
        assert_eq!(html.matches("<img").count(), 1, "{html}");
        assert!(html.contains("data:image/png;base64,iVBORw0KGgo") && html.contains("class 0: &lt;mask&gt;"));
        // The refused entry is only in the escaped report dump, never an attribute.
        assert!(!html.contains("\" onerror"), "{html}");
        assert!(sample("mmbd", false).table().contains("not flagged"));
    }
}
