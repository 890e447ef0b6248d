//! `audit harden MODEL.onnx --data DATA [--defense none]`: runs a defense plugin on the model and
//! its training data, checks the hardened model (same graph, engine/onnxruntime parity), writes it
//! atomically beside the input, and measures before/after on the exported file.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;
use comfy_table::{presets::UTF8_FULL_CONDENSED, Table};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::args::{DataArgs, DefenseRunArgs};
use super::GlobalArgs;
use crate::data;
use crate::engine::{input_chw, parity, random_batch, PARITY_TOLERANCE};
use crate::error::{input_error, EXIT_FLAGGED, EXIT_OK};
use crate::evaluate::{evaluate, precision_recall, AttackSpec, Metrics};
use crate::output::Outputs;
use crate::plugin::{CallInput, Kind, Op, PluginError};
use crate::report::scan::{Finding, ScanVerdict};
use crate::report::{self, Report, Row};

#[derive(Debug, Args)]
pub struct HardenArgs {
    pub model: PathBuf,
    #[command(flatten)]
    pub data: DataArgs,
    /// Defense plugin.
    #[arg(long, default_value = "none")]
    pub defense: String,
    /// Hardened model (default: MODEL.hardened.onnx beside the input).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Defense parameter KEY=VALUE (repeatable), checked against the defense's schema.
    #[arg(long = "param", value_name = "KEY=VALUE")]
    pub params: Vec<String>,
    #[command(flatten)]
    pub run: DefenseRunArgs,
    /// Replace an existing output.
    #[arg(long)]
    pub force: bool,
    #[arg(long)]
    pub json: bool,
    /// `audit compare` scans the model it starts from itself: its children scan only the
    /// hardened model.
    #[arg(long, hide = true)]
    pub verify_after_only: bool,
}

/// Splits off the last `n` samples: (the rest, the last n).
fn split_tail(set: &data::LabeledSet, n: usize) -> (data::LabeledSet, data::LabeledSet) {
    let keep = set.len() - n;
    let per = set.images.image_len();
    let part = |a: usize, b: usize| data::LabeledSet {
        images: data::Images {
            n: b - a,
            pixels: match &set.images.pixels {
                data::Pixels::U8(v) => data::Pixels::U8(v[a * per..b * per].to_vec()),
                data::Pixels::F32(v) => data::Pixels::F32(v[a * per..b * per].to_vec()),
            },
            c: set.images.c,
            h: set.images.h,
            w: set.images.w,
        },
        labels: set.labels[a..b].to_vec(),
    };
    (part(0, keep), part(keep, set.len()))
}

/// `MODEL.hardened.onnx` beside `model`.
pub fn default_out(model: &Path) -> PathBuf {
    let stem = model.file_stem().and_then(|s| s.to_str()).unwrap_or("model");
    model.with_file_name(format!("{stem}.hardened.onnx"))
}

/// Adds or replaces metadata entries in ONNX bytes.
pub(crate) fn with_metadata(bytes: &[u8], entries: &[(String, String)]) -> Result<Vec<u8>> {
    use audit_nn::prost::Message;
    let mut proto = audit_nn::model::parse(bytes)?;
    for (k, v) in entries {
        proto.metadata_props.retain(|e| e.key() != k);
        proto.metadata_props.push(audit_nn::proto::StringStringEntryProto {
            key: Some(k.clone()),
            value: Some(v.clone()),
        });
    }
    Ok(proto.encode_to_vec())
}

fn op_types(bytes: &[u8]) -> Result<Vec<String>> {
    let proto = audit_nn::model::parse(bytes)?;
    Ok(proto
        .graph
        .map(|g| g.node.iter().map(|n| n.op_type().to_string()).collect())
        .unwrap_or_default())
}

/// Replaces per-round suspect lists by counts and, when the poisoned indices are known, their
/// precision and recall.
fn summarise_report(report: &mut Map<String, Value>, truth: Option<&HashSet<i64>>) {
    if let Some(Value::Array(rounds)) = report.get_mut("rounds") {
        for r in rounds.iter_mut() {
            if let Some(Value::Array(s)) = r.get_mut("suspects").map(Value::take) {
                let ids: Vec<i64> = s.iter().filter_map(Value::as_i64).collect();
                if let Some(t) = truth {
                    r["suspects_vs_poison_idx"] = precision_recall(&ids, t);
                }
            }
            if let Value::Object(o) = r {
                o.remove("suspects");
            }
        }
    }
}

/// The metrics of one model in a [`HardenOutcome`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MeasuredMetrics {
    pub clean_accuracy: f64,
    pub attack_success_rate: Option<f64>,
    pub robust_accuracy: Option<f64>,
    pub per_class_accuracy: Vec<Option<f64>>,
    pub per_class_attack_success_rate: Option<Vec<Option<f64>>>,
}

impl From<&Metrics> for MeasuredMetrics {
    fn from(m: &Metrics) -> MeasuredMetrics {
        MeasuredMetrics {
            clean_accuracy: m.clean_accuracy,
            attack_success_rate: m.attack_success_rate,
            robust_accuracy: m.robust_accuracy,
            per_class_accuracy: m.per_class_accuracy.clone(),
            per_class_attack_success_rate: m.per_class_asr.clone(),
        }
    }
}

/// The outcome of one `audit harden` run, typed: `--json` prints it, `audit compare` reads it
/// back from each of its `harden` children, and [`HardenOutcome::row`] makes the run's report row
/// (was a `json!` document that harden parsed back into its own row).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HardenOutcome {
    pub schema_version: u32,
    pub defense: String,
    pub defense_version: String,
    pub defense_library: String,
    pub defense_sha256: String,
    pub params: Value,
    pub model: report::ModelInfo,
    pub output: String,
    pub output_sha256: String,
    pub data: String,
    pub n_train: usize,
    pub n_test: usize,
    pub n_clean: Option<usize>,
    pub seconds: f64,
    pub device: String,
    pub seed: u64,
    pub parity_max_rel_diff: Option<f64>,
    pub eval_attack: Option<String>,
    pub before: MeasuredMetrics,
    pub after: MeasuredMetrics,
    pub peak_rss_bytes: Option<u64>,
    pub data_fingerprint: String,
    /// The plugin's report, with the host's summary (`dropped_vs_poison_idx` when the data has
    /// `poison_idx`).
    pub defense_report: Value,
    /// `--verify`: the detectors' findings on the input model and on the hardened one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify: Option<Verification>,
}

/// What `--verify` found: the same detectors on the model before and after hardening.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Verification {
    /// On the input model (absent in `audit compare`'s children: compare scans it once itself).
    pub before: Option<Vec<Finding>>,
    /// On the hardened model.
    pub after: Vec<Finding>,
}

impl HardenOutcome {
    /// The report row of this run (`audit compare` makes its rows from its children's outcomes).
    pub fn row(&self) -> Row {
        let dropped = &self.defense_report["dropped_vs_poison_idx"];
        Row {
            defense: self.defense.clone(),
            version: Some(self.defense_version.clone()),
            params: self.params.clone(),
            status: "ok".into(),
            error: None,
            clean_accuracy: Some(self.after.clean_accuracy).filter(|v| v.is_finite()),
            attack_success_rate: self.after.attack_success_rate,
            robust_accuracy: self.after.robust_accuracy,
            der: None,
            seconds: Some(self.seconds),
            peak_rss_bytes: self.peak_rss_bytes,
            precision: dropped["precision"].as_f64(),
            recall: dropped["recall"].as_f64(),
            n_dropped: dropped["found"].as_u64().map(|n| n as usize),
            per_class_accuracy: self.after.per_class_accuracy.clone(),
            per_class_asr: self.after.per_class_attack_success_rate.clone().unwrap_or_default(),
            output: Some(self.output.clone()),
            output_sha256: Some(self.output_sha256.clone()),
            defense_report: self.defense_report.clone(),
            library: Some(self.defense_library.clone()),
            library_sha256: Some(self.defense_sha256.clone()),
            scan: self.verify.as_ref().map(|v| ScanVerdict::of(&v.after)),
        }
    }
}

pub fn run(args: HardenArgs, global: &GlobalArgs) -> Result<i32> {
    let started = std::time::Instant::now();
    let out = args.out.clone().unwrap_or_else(|| default_out(&args.model));
    let data_path = Path::new(&args.data.data);
    let mut inputs: Vec<&Path> = vec![&args.model];
    if data_path.exists() {
        inputs.push(data_path);
    }
    let dirs = crate::plugin::search_dirs(&global.plugin_dirs);
    let defense = super::plugins::find(&dirs, &args.defense)?;
    if defense.kind != Kind::Defense {
        return Err(input_error(format!(
            "`{}` is a {} plugin, not a defense",
            defense.name, defense.kind
        )));
    }
    let params = defense.schema.resolve_args(&args.params).map_err(|e| {
        let hint = if args.run.eval_attack.is_some() {
            " (parameters of --eval-attack go in --attack-param)"
        } else {
            ""
        };
        PluginError::InvalidInput {
            name: defense.name.clone(),
            path: defense.path.clone(),
            message: format!("{e}{hint}"),
        }
    })?;
    let (attack, attack_params) = match args.run.eval_attack.as_deref() {
        Some(n) => {
            let (a, p) = super::plugins::eval_attack(&dirs, n, &args.run.attack_params)?;
            (Some(a), Some(p))
        }
        None if !args.run.attack_params.is_empty() => {
            return Err(input_error("--attack-param needs --eval-attack NAME"))
        }
        None => (None, None),
    };
    let scanner = args.run.scanner(&dirs)?;

    let mut outputs = Outputs::new(args.force, &inputs);
    outputs.plan("--out", &out)?;
    for r in &args.run.reports {
        report::Format::of(r)?;
        outputs.plan("--report", r)?;
    }
    crate::signals::phase("harden:load");
    let (original, norm) = args.data.model_and_normalization(&args.model)?;
    let lent = with_metadata(&original, &norm.metadata())?;
    let ds = args.data.load(args.run.seed)?;
    crate::evaluate::check_model_fits_data(&original, &args.model.display().to_string(), &ds)?;
    let train = match args.run.limit {
        Some(k) => ds.train.head(k),
        None => ds.train.clone(),
    };
    if defense.capabilities & audit_abi::AUDIT_CAP_NEEDS_TRAINING_DATA != 0 && train.is_empty() {
        return Err(input_error(format!(
            "`{}` needs the training set, and {} has no training samples{}",
            defense.name,
            ds.source,
            if args.run.limit == Some(0) { " (--limit 0)" } else { "" }
        )));
    }
    // A defense that needs a clean subset gets one or an error; one that only uses it gets one
    // when the test split can spare it (the evaluation keeps the rest) and --clean-size is not 0.
    let needs_clean = defense.capabilities & audit_abi::AUDIT_CAP_NEEDS_CLEAN_DATA != 0;
    let uses_clean = defense.capabilities & audit_abi::AUDIT_CAP_USES_CLEAN_DATA != 0
        && ds.test.len() >= 2
        && args.run.clean_size != 0;
    let (eval_pool, clean) = if needs_clean || uses_clean {
        let clean_size = args
            .run
            .clean_size_for(ds.test.len())
            .map_err(|e| input_error(format!("`{}` needs a clean subset: {e}", defense.name)))?;
        let (head, tail) = split_tail(&ds.test, clean_size);
        (head, Some(tail))
    } else {
        (ds.test.clone(), None)
    };
    let test = match args.run.test_limit {
        Some(k) => eval_pool.head(k),
        None => eval_pool,
    };
    let truth: Option<HashSet<i64>> = ds
        .poison_idx
        .as_ref()
        .map(|ix| ix.iter().copied().filter(|&i| (i as usize) < train.len()).collect());
    let (_, device_name) = args.run.device.resolve()?;

    let spec = attack
        .as_ref()
        .zip(attack_params.as_ref())
        .map(|(p, params)| AttackSpec {
            plugin: p,
            params,
            seed: args.run.seed,
        });
    let before = evaluate(&original, &test, ds.num_classes, &norm, spec.as_ref())?;
    let verify_clean = scanner
        .as_ref()
        .filter(|s| s.needs_clean())
        .map(|_| super::scan::clean_images(&ds));
    let scan = |what: String, model: &[u8]| -> Result<Option<Vec<Finding>>> {
        scanner
            .as_ref()
            .map(|s| {
                crate::signals::phase("harden:verify");
                s.run(
                    &what,
                    model,
                    None,
                    verify_clean.as_ref(),
                    ds.num_classes,
                    device_name,
                    args.run.seed,
                )
            })
            .transpose()
    };
    let scan_before = if args.verify_after_only {
        None
    } else {
        scan(args.model.display().to_string(), &lent)?
    };

    eprintln!(
        "hardening {} with `{}` on {} training samples ({device_name})",
        args.model.display(),
        defense.name,
        train.len()
    );
    crate::signals::phase("harden:train");
    let result = defense.call(&CallInput {
        op: Op::Defend,
        params: &params,
        seed: args.run.seed,
        device: device_name,
        model: Some(&lent),
        data: Some(&train),
        clean: clean.as_ref(),
        num_classes: ds.num_classes,
    })?;
    let hardened = result.model.context("the defense returned no model")?;

    // The artifact must be the same graph, and the engine and onnxruntime must agree on it.
    if op_types(&hardened)? != op_types(&original)? {
        anyhow::bail!(
            "the defense changed the graph's nodes; refusing to write {}",
            out.display()
        );
    }
    let mut entries = vec![
        (
            "audit.source_sha256".to_string(),
            audit_nn::export::sha256_hex(&original),
        ),
        (
            "audit.toolkit_version".to_string(),
            env!("CARGO_PKG_VERSION").to_string(),
        ),
        ("audit.seed".to_string(), args.run.seed.to_string()),
    ];
    entries.extend(norm.metadata());
    let hardened = with_metadata(&hardened, &entries)?;
    let engine_model = audit_nn::Model::load(&hardened, None).context("the engine cannot reload the hardened model")?;
    let chw = input_chw(
        &engine_model,
        Some([train.images.c as i64, train.images.h as i64, train.images.w as i64]),
    )?;
    let shape = [4, chw[0], chw[1], chw[2]];
    let diff = parity(&engine_model, &hardened, &random_batch(4, chw, 99), &shape)?;
    if diff > PARITY_TOLERANCE {
        anyhow::bail!("hardened model failed its parity check (engine vs onnxruntime {diff:.3e} > {PARITY_TOLERANCE:e}); nothing written");
    }
    crate::signals::phase("harden:write");
    outputs.stage(&out, &hardened)?;

    let after = evaluate(&hardened, &test, ds.num_classes, &norm, spec.as_ref())?;
    let verify = scan(format!("{} (hardened)", out.display()), &hardened)?.map(|after| Verification {
        before: scan_before,
        after,
    });
    let mut report = result.report;
    summarise_report(&mut report, truth.as_ref());
    if let (Some(t), Some(dropped)) = (&truth, result.indices.as_ref().filter(|d| !d.is_empty())) {
        report.insert("dropped_vs_poison_idx".into(), precision_recall(dropped, t));
    }
    let seconds = started.elapsed().as_secs_f64();
    let fingerprint = data::fingerprint(&[&ds.train, &ds.test]);
    let outcome = HardenOutcome {
        schema_version: 1,
        defense: defense.name.clone(),
        defense_version: defense.version.clone(),
        defense_library: defense.path.display().to_string(),
        defense_sha256: defense.sha256.clone(),
        params: Value::Object(params.clone()),
        model: report::ModelInfo {
            path: args.model.display().to_string(),
            sha256: audit_nn::export::sha256_hex(&original),
        },
        output: out.display().to_string(),
        output_sha256: audit_nn::export::sha256_hex(&hardened),
        data: ds.source.clone(),
        n_train: train.len(),
        n_test: test.len(),
        n_clean: clean.as_ref().map(data::LabeledSet::len),
        seconds,
        device: device_name.to_string(),
        seed: args.run.seed,
        parity_max_rel_diff: Some(diff).filter(|d| d.is_finite()),
        eval_attack: args.run.eval_attack.clone(),
        before: (&before).into(),
        after: (&after).into(),
        peak_rss_bytes: crate::runtime::peak_rss_bytes(),
        data_fingerprint: fingerprint,
        defense_report: Value::Object(report),
        verify,
    };
    let verdict = |f: Option<&Vec<Finding>>| f.map(|f| ScanVerdict::of(f));
    let (verdict_before, verdict_after) = match &outcome.verify {
        Some(v) => (verdict(v.before.as_ref()), verdict(Some(&v.after))),
        None => (None, None),
    };
    if !args.run.reports.is_empty() {
        let mut r = Report {
            schema_version: report::SCHEMA_VERSION,
            command: "harden".into(),
            toolkit_version: env!("CARGO_PKG_VERSION").into(),
            created: report::now_rfc3339(),
            model: outcome.model.clone(),
            data: report::DataInfo {
                source: ds.source.clone(),
                fingerprint: outcome.data_fingerprint.clone(),
                num_classes: ds.num_classes,
                n_train: train.len(),
                n_eval: test.len(),
                n_clean: clean.as_ref().map_or(0, data::LabeledSet::len),
                n_poisoned: truth.as_ref().map(HashSet::len),
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
            device: device_name.to_string(),
            baseline: Row {
                scan: verdict_before.clone(),
                ..Row::measured("undefended", &before)
            },
            rows: vec![outcome.row()],
            best: Default::default(),
        };
        r.finish();
        for path in &args.run.reports {
            outputs.stage(path, r.render(path)?.as_bytes())?;
        }
    }
    // Every output lands now or none does; a cancelled run writes nothing.
    crate::signals::phase("harden:commit");
    outputs.commit()?;
    // A hardened model the detectors still flag is written (the report says so), and the exit
    // code tells a pipeline, as `audit scan`'s does.
    let code = if verdict_after.as_ref().is_some_and(|v| v.flagged) {
        EXIT_FLAGGED
    } else {
        EXIT_OK
    };
    if let Some(b) = &verdict_before {
        eprintln!("scan verdict before hardening: {}", b.text());
    }
    if let Some(a) = &verdict_after {
        eprintln!(
            "scan verdict after hardening: {}{}",
            a.text(),
            if code == EXIT_FLAGGED { " (exit 3)" } else { "" }
        );
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&outcome)?);
        return Ok(code);
    }
    println!(
        "wrote {} ({} on {device_name}, {seconds:.1}s, parity {diff:.1e})",
        out.display(),
        defense.name
    );
    if spec.is_some() {
        let (b, a) = (&before, &after);
        let mut t = Table::new();
        t.load_preset(UTF8_FULL_CONDENSED);
        t.set_header(["", "clean accuracy", "attack success rate", "robust accuracy"]);
        let f = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{v:.4}"));
        t.add_row([
            "before".to_string(),
            f(Some(b.clean_accuracy)),
            f(b.attack_success_rate),
            f(b.robust_accuracy),
        ]);
        t.add_row([
            "after".to_string(),
            f(Some(a.clean_accuracy)),
            f(a.attack_success_rate),
            f(a.robust_accuracy),
        ]);
        println!("{t}");
    }
    if let Some(pr) = outcome.defense_report.get("dropped_vs_poison_idx") {
        println!(
            "suspects dropped: {} (precision {}, recall {} against the data's poison_idx)",
            pr["found"], pr["precision"], pr["recall"]
        );
    }
    Ok(code)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn outcome() -> HardenOutcome {
        let metrics = |acc: f64, asr: Option<f64>| MeasuredMetrics {
            clean_accuracy: acc,
            attack_success_rate: asr,
            robust_accuracy: asr.map(|a| 1.0 - a),
            per_class_accuracy: vec![Some(acc), None],
            per_class_attack_success_rate: asr.map(|a| vec![None, Some(a)]),
        };
        HardenOutcome {
            schema_version: 1,
            defense: "none".into(),
            defense_version: "0.1.0".into(),
            defense_library: "/p/libnone.so".into(),
            defense_sha256: "ab".into(),
            params: json!({"R": 1}),
            model: report::ModelInfo {
                path: "m.onnx".into(),
                sha256: "cd".into(),
            },
            output: "m.hardened.onnx".into(),
            output_sha256: "ef".into(),
            data: "d.npz".into(),
            n_train: 10,
            n_test: 5,
            n_clean: None,
            seconds: 1.5,
            device: "cpu".into(),
            seed: 3,
            parity_max_rel_diff: None,
            eval_attack: Some("badnets".into()),
            before: metrics(0.9, Some(0.99)),
            after: metrics(0.88, Some(0.01)),
            peak_rss_bytes: Some(1 << 20),
            data_fingerprint: "01".into(),
            defense_report: json!({"dropped_vs_poison_idx": {"found": 4, "precision": 0.75, "recall": 1.0}}),
            verify: None,
        }
    }

    #[test]
    fn the_outcome_compare_reads_back_is_the_one_harden_printed() {
        let o = outcome();
        let text = serde_json::to_string_pretty(&o).unwrap();
        let doc: Value = serde_json::from_str(&text).unwrap();
        // The document's field names stay those `harden --json` has always printed.
        assert_eq!(doc["after"]["per_class_attack_success_rate"], json!([null, 0.01]));
        assert_eq!(doc["model"]["sha256"], "cd");
        assert!(doc["parity_max_rel_diff"].is_null());
        let back: HardenOutcome = serde_json::from_str(&text).unwrap();
        let (a, b) = (o.row(), back.row());
        assert_eq!(a, b);
        assert_eq!((a.precision, a.recall, a.n_dropped), (Some(0.75), Some(1.0), Some(4)));
        assert_eq!((a.clean_accuracy, a.attack_success_rate), (Some(0.88), Some(0.01)));
        assert_eq!(a.per_class_asr, vec![None, Some(0.01)]);
    }

    #[test]
    fn a_document_that_is_not_an_outcome_is_refused() {
        let mut doc = serde_json::to_value(outcome()).unwrap();
        doc.as_object_mut().unwrap().remove("after");
        let e = serde_json::from_value::<HardenOutcome>(doc).unwrap_err().to_string();
        assert!(e.contains("after"), "{e}");
    }
}
