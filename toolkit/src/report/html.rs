//! The self-contained HTML report: one file, inline CSS and inline SVG charts (drawn with
//! plotters' SVG backend), no scripts, no network.

use anyhow::{anyhow, Result};
use minijinja::{context, Environment};
use plotters::prelude::*;
use serde::Serialize;

use super::{cells, columns, header, one_line, provenance, Report, Row, SCAN_NOTE};

const TEMPLATE: &str = include_str!("report.html");
/// The style every HTML report shares (`{% include "style.html" %}`).
pub(super) const STYLE: &str = include_str!("style.html");

/// Series colours (colour-blind friendly, Okabe-Ito), the baseline first.
const COLOURS: &[RGBColor] = &[
    RGBColor(0x55, 0x55, 0x55),
    RGBColor(0x00, 0x72, 0xB2),
    RGBColor(0xE6, 0x9F, 0x00),
    RGBColor(0x00, 0x9E, 0x73),
    RGBColor(0xCC, 0x79, 0xA7),
    RGBColor(0xD5, 0x5E, 0x00),
    RGBColor(0x56, 0xB4, 0xE9),
    RGBColor(0xF0, 0xE4, 0x42),
];

fn colour(i: usize) -> RGBColor {
    COLOURS[i % COLOURS.len()]
}

fn plot_err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("drawing a report chart: {e:?}")
}

/// The baseline and every measured defense, with their colour index.
fn measured(report: &Report) -> Vec<(usize, &Row)> {
    std::iter::once(&report.baseline)
        .chain(report.rows.iter())
        .enumerate()
        .filter(|(_, r)| r.ok() && r.clean_accuracy.is_some())
        .collect()
}

/// Width of the legend column right of a chart.
const LEGEND_W: u32 = 150;

/// A legend drawn in its own area (beside the plot, so it never hides a point or a bar).
fn legend<DB: DrawingBackend>(area: &DrawingArea<DB, plotters::coord::Shift>, rows: &[(usize, &Row)]) -> Result<()>
where
    DB::ErrorType: 'static,
{
    for (j, (i, row)) in rows.iter().enumerate() {
        let y = 48 + 20 * j as i32;
        area.draw(&Rectangle::new([(8, y - 6), (20, y + 6)], colour(*i).filled()))
            .map_err(plot_err)?;
        area.draw(&Text::new(row.defense.clone(), (26, y - 7), ("sans-serif", 13)))
            .map_err(plot_err)?;
    }
    Ok(())
}

/// Clean accuracy against attack success rate, one point per model.
fn acc_vs_asr(report: &Report) -> Result<Option<String>> {
    let rows: Vec<(usize, &Row, f64, f64)> = measured(report)
        .into_iter()
        .filter_map(|(i, r)| Some((i, r, r.attack_success_rate?, r.clean_accuracy?)))
        .collect();
    if rows.is_empty() {
        return Ok(None);
    }
    let lo = rows.iter().map(|r| r.3).fold(1.0, f64::min);
    let y0 = ((lo - 0.05) * 20.0).floor().max(0.0) / 20.0;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (560 + LEGEND_W, 380)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        let (plot, side) = root.split_horizontally(560);
        let order: Vec<(usize, &Row)> = rows.iter().map(|r| (r.0, r.1)).collect();
        legend(&side, &order)?;
        let mut chart = ChartBuilder::on(&plot)
            .caption("Clean accuracy vs attack success rate", ("sans-serif", 16))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(52)
            .build_cartesian_2d(-0.02f64..1.02f64, y0..1.0f64)
            .map_err(plot_err)?;
        chart
            .configure_mesh()
            .x_desc("attack success rate (lower is better)")
            .y_desc("clean accuracy")
            .light_line_style(RGBColor(0xEE, 0xEE, 0xEE))
            .draw()
            .map_err(plot_err)?;
        // Later rows on top; a hollow ring keeps coincident points visible.
        chart
            .draw_series(
                rows.iter()
                    .map(|(i, _, asr, acc)| Circle::new((*asr, *acc), 6, colour(*i).filled())),
            )
            .map_err(plot_err)?;
        chart
            .draw_series(
                rows.iter()
                    .map(|(i, _, asr, acc)| Circle::new((*asr, *acc), 9, colour(*i).stroke_width(1))),
            )
            .map_err(plot_err)?;
        root.present().map_err(plot_err)?;
    }
    Ok(Some(svg))
}

/// Attack success rate per true class, grouped bars per model.
fn per_class_asr(report: &Report) -> Result<Option<String>> {
    let rows: Vec<(usize, &Row)> = measured(report)
        .into_iter()
        .filter(|(_, r)| r.per_class_asr.iter().any(Option::is_some))
        .collect();
    let k = rows.iter().map(|r| r.1.per_class_asr.len()).max().unwrap_or(0);
    if rows.is_empty() || k == 0 {
        return Ok(None);
    }
    let width = (120 + k * (12 + 9 * rows.len())).clamp(560, 1000) as u32;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (width + LEGEND_W, 340)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        let (plot, side) = root.split_horizontally(width);
        legend(&side, &rows)?;
        let mut chart = ChartBuilder::on(&plot)
            .caption("Attack success rate per true class", ("sans-serif", 16))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(52)
            .build_cartesian_2d(-0.5f64..k as f64 - 0.5, 0f64..1.0f64)
            .map_err(plot_err)?;
        chart
            .configure_mesh()
            .x_desc("true class (the target class has no ASR)")
            .y_desc("ASR")
            .x_labels(k)
            .x_label_formatter(&|x| {
                if (x - x.round()).abs() < 1e-6 && *x >= 0.0 {
                    format!("{}", x.round() as usize)
                } else {
                    String::new()
                }
            })
            .disable_x_mesh()
            .light_line_style(RGBColor(0xEE, 0xEE, 0xEE))
            .draw()
            .map_err(plot_err)?;
        let slot = 0.8 / rows.len() as f64;
        for (j, (i, row)) in rows.iter().enumerate() {
            let c = colour(*i);
            let bars = row.per_class_asr.iter().enumerate().filter_map(move |(class, v)| {
                let v = (*v)?;
                let x0 = class as f64 - 0.4 + j as f64 * slot;
                Some(Rectangle::new([(x0, 0.0), (x0 + slot * 0.9, v.max(0.004))], c.filled()))
            });
            chart.draw_series(bars).map_err(plot_err)?;
        }
        root.present().map_err(plot_err)?;
    }
    Ok(Some(svg))
}

/// Wall time per defense, horizontal bars.
fn times(report: &Report) -> Result<Option<String>> {
    let rows: Vec<(usize, &Row, f64)> = report
        .rows
        .iter()
        .enumerate()
        .filter_map(|(i, r)| Some((i + 1, r, r.seconds?)))
        .collect();
    if rows.is_empty() {
        return Ok(None);
    }
    let max = rows.iter().map(|r| r.2).fold(0.0, f64::max).max(1e-3) * 1.15;
    let n = rows.len();
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (560, 80 + 34 * n as u32)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        let mut chart = ChartBuilder::on(&root)
            .caption("Wall time per defense", ("sans-serif", 16))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(110)
            .build_cartesian_2d(0f64..max, 0f64..n as f64)
            .map_err(plot_err)?;
        let names: Vec<String> = rows.iter().map(|r| r.1.defense.clone()).collect();
        chart
            .configure_mesh()
            .x_desc("seconds")
            .y_labels(n * 2 + 1)
            .y_label_formatter(&|y| {
                let i = y.floor() as usize;
                if (y - y.floor() - 0.5).abs() < 1e-9 && i < names.len() {
                    names[n - 1 - i].clone()
                } else {
                    String::new()
                }
            })
            .disable_y_mesh()
            .light_line_style(RGBColor(0xEE, 0xEE, 0xEE))
            .draw()
            .map_err(plot_err)?;
        chart
            .draw_series(rows.iter().enumerate().map(|(j, (i, _, s))| {
                let y = (n - 1 - j) as f64;
                Rectangle::new([(0.0, y + 0.2), (*s, y + 0.8)], colour(*i).filled())
            }))
            .map_err(plot_err)?;
        chart
            .draw_series(rows.iter().enumerate().map(|(j, (_, _, s))| {
                let y = (n - 1 - j) as f64 + 0.5;
                Text::new(format!(" {s:.1} s"), (*s, y), ("sans-serif", 12))
            }))
            .map_err(plot_err)?;
        root.present().map_err(plot_err)?;
    }
    Ok(Some(svg))
}

#[derive(Serialize)]
pub(super) struct Cell {
    pub(super) text: String,
    pub(super) best: bool,
}

#[derive(Serialize)]
pub(super) struct TableRow {
    pub(super) defense: String,
    pub(super) baseline: bool,
    pub(super) failed: bool,
    pub(super) error: String,
    pub(super) cells: Vec<Cell>,
}

#[derive(Serialize)]
struct Detail {
    defense: String,
    version: String,
    status: String,
    error: String,
    params: String,
    output: String,
    output_sha256: String,
    /// The defense plugin's library (canonical path) and its sha256, or `-`.
    library: String,
    library_sha256: String,
    /// Training samples the defense dropped (detect-and-drop defenses), as text.
    dropped: String,
    report: String,
}

/// Renders the report as one self-contained HTML page.
/// The results table of `report`: the baseline first, then each defense.
pub(super) fn table_rows(report: &Report) -> Vec<TableRow> {
    let table_row = |row: &Row, baseline: bool| TableRow {
        defense: row.defense.clone(),
        baseline,
        failed: !row.ok(),
        error: one_line(row.error.as_deref().unwrap_or(""), 300),
        cells: if row.ok() {
            cells(report, row, baseline)
                .into_iter()
                .map(|(text, best)| Cell { text, best })
                .collect()
        } else {
            vec![]
        },
    };
    std::iter::once(table_row(&report.baseline, true))
        .chain(report.rows.iter().map(|r| table_row(r, false)))
        .collect()
}

/// Renders the report as one self-contained HTML page.
pub fn html(report: &Report) -> Result<String> {
    let table = table_rows(report);
    let details: Vec<Detail> = report
        .rows
        .iter()
        .map(|r| Detail {
            defense: r.defense.clone(),
            version: r.version.clone().unwrap_or_else(|| "-".into()),
            status: r.status.clone(),
            error: r.error.clone().unwrap_or_default(),
            params: serde_json::to_string_pretty(&r.params).unwrap_or_default(),
            output: r.output.clone().unwrap_or_else(|| "-".into()),
            output_sha256: r.output_sha256.clone().unwrap_or_else(|| "-".into()),
            library: r.library.clone().unwrap_or_else(|| "-".into()),
            library_sha256: r.library_sha256.clone().unwrap_or_else(|| "-".into()),
            dropped: match (r.n_dropped, r.precision, r.recall) {
                (Some(n), Some(p), Some(q)) => {
                    format!(
                        "{n} training samples dropped as suspects (precision {p:.4}, recall {q:.4} against poison_idx)"
                    )
                }
                (Some(n), _, _) => format!("{n} training samples dropped as suspects"),
                _ => String::new(),
            },
            report: if r.defense_report.is_null() {
                String::new()
            } else {
                serde_json::to_string_pretty(&r.defense_report).unwrap_or_default()
            },
        })
        .collect();
    let charts: Vec<String> = [acc_vs_asr(report)?, per_class_asr(report)?, times(report)?]
        .into_iter()
        .flatten()
        .collect();
    let provenance: Vec<(String, String)> = provenance(report)
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    let mut env = Environment::new();
    env.add_template("style.html", STYLE)?;
    env.add_template("report.html", TEMPLATE)?;
    let page = env.get_template("report.html")?.render(context! {
        title => format!("audit {} report: {}", report.command, report.model.path),
        command => &report.command,
        provenance => provenance,
        header => header(report),
        table => table,
        charts => charts,
        details => details,
        columns => columns(report).iter().map(|c| c.1).collect::<Vec<_>>(),
        scan_note => if report.has_scan() { SCAN_NOTE } else { "" },
    })?;
    Ok(page)
}

#[cfg(test)]
mod tests {
    use super::super::tests::sample;
    use super::*;

    #[test]
    fn page_is_self_contained_escaped_and_has_every_chart() {
        let r = sample();
        let page = html(&r).unwrap();
        assert!(page.starts_with("<!DOCTYPE html>"));
        assert_eq!(page.matches("<svg").count(), 3, "three charts");
        // No fetch of any kind: no scripts, stylesheets, images or fonts from elsewhere.
        for bad in ["<script", "<link", "src=", "@import", "url("] {
            assert!(!page.contains(bad), "{bad} in the page");
        }
        for n in ["none", "finetune", "undefended", "nad"] {
            assert!(page.contains(n), "{n}");
        }
        assert!(page.contains("fashion-mnist &lt;x&gt; &amp; y"), "data source escaped");
        assert!(page.contains("unknown layer `x`"), "the failure's error");
        assert!(page.contains("class=\"best\""), "best values marked");
        assert!(page.contains(&r.model.sha256) && page.contains(&r.data.fingerprint));
        assert!(page.contains("17 training samples dropped as suspects (precision 0.3000"));
    }

    #[test]
    fn finding_low_html_report_escapes_untrusted_fields() {
        let mut r = sample();
        let evil = "<img src=x onerror=alert(1)>";
        // The name reaches the charts' legends (SVG, inserted unescaped by the template) too.
        r.rows[0].defense = format!("<script>{evil}</script>");
        r.rows[0].params = serde_json::json!({ "k": evil });
        r.rows[0].library = Some(format!("/p/{evil}.so"));
        r.rows[2].error = Some(format!("boom {evil}"));
        r.model.path = format!("/m/{evil}.onnx");
        r.finish();
        let page = html(&r).unwrap();
        assert!(!page.contains("<img") && !page.contains("<script"), "{page}");
        assert!(page.contains("&lt;img"), "escaped, not dropped");
        assert_eq!(page.matches("<svg").count(), 3, "the charts still render");
    }

    #[test]
    fn a_report_with_nothing_measured_still_renders() {
        let mut r = sample();
        r.rows.retain(|row| !row.ok());
        r.eval_attack = None;
        r.baseline.attack_success_rate = None;
        r.baseline.per_class_asr.clear();
        r.finish();
        let page = html(&r).unwrap();
        assert!(page.contains("FAILED"));
    }
}
