//! `audit eval MODEL.onnx --data DATA [--attack NAME --param k=v ...] [--json]`: clean accuracy,
//! and with an attack, attack success rate and robust accuracy, measured on the ONNX file
//! through onnxruntime or tract (`--runtime`; by default onnxruntime, tract when it cannot load).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use serde_json::json;

use super::args::DataArgs;
use super::GlobalArgs;
use crate::error::{input_error, EXIT_OK};
use crate::evaluate::{evaluate_with, AttackSpec};
use crate::infer::{load_runtime, RuntimeChoice};
use crate::plugin::PluginError;

#[derive(Debug, Args)]
pub struct EvalArgs {
    pub model: PathBuf,
    #[command(flatten)]
    pub data: DataArgs,
    /// Attack plugin whose trigger measures attack success.
    #[arg(long)]
    pub attack: Option<String>,
    /// Attack parameter KEY=VALUE (repeatable).
    #[arg(long = "param", value_name = "KEY=VALUE")]
    pub params: Vec<String>,
    /// Evaluate on the first N test images only.
    #[arg(long)]
    pub limit: Option<usize>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Inference runtime: onnxruntime, tract (pure Rust), or auto (onnxruntime when its library
    /// loads, else tract).
    #[arg(long, value_enum, default_value = "auto")]
    pub runtime: RuntimeChoice,
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: EvalArgs, global: &GlobalArgs) -> Result<i32> {
    let (bytes, norm) = args.data.model_and_normalization(&args.model)?;
    let ds = args.data.load(args.seed)?;
    let test = match args.limit {
        Some(k) => ds.test.head(k),
        None => ds.test.clone(),
    };
    if test.is_empty() {
        return Err(input_error(format!(
            "{}: the test split is empty{}: there is nothing to evaluate",
            ds.source,
            if args.limit == Some(0) { " (--limit 0)" } else { "" }
        )));
    }
    if args.attack.is_none() && !args.params.is_empty() {
        return Err(input_error("--param needs --attack NAME"));
    }
    let dirs = crate::plugin::search_dirs(&global.plugin_dirs);
    let plugin = args
        .attack
        .as_deref()
        .map(|name| super::plugins::find(&dirs, name))
        .transpose()?;
    let params = match &plugin {
        Some(p) => Some(
            p.schema
                .resolve_args(&args.params)
                .map_err(|e| PluginError::InvalidInput {
                    name: p.name.clone(),
                    path: p.path.clone(),
                    message: e.to_string(),
                })?,
        ),
        None => None,
    };
    let spec = plugin.as_ref().zip(params.as_ref()).map(|(p, params)| AttackSpec {
        plugin: p,
        params,
        seed: args.seed,
    });
    let started = std::time::Instant::now();
    let mut model = load_runtime(&bytes, args.runtime).with_context(|| format!("{}", args.model.display()))?;
    let runtime = model.name();
    crate::signals::phase("eval:run");
    let m = evaluate_with(model.as_mut(), &test, ds.num_classes, &norm, spec.as_ref())
        .with_context(|| format!("evaluating {} on {}", args.model.display(), ds.source))?;
    let seconds = started.elapsed().as_secs_f64();
    if args.json {
        let doc = json!({
            "schema_version": 1,
            "model": {"path": args.model.display().to_string(), "sha256": audit_nn::export::sha256_hex(&bytes)},
            "runtime": runtime,
            "data": ds.source,
            "n_test": m.n_test,
            "seconds": seconds,
            "attack": args.attack,
            "params": params,
            "metrics": {
                "clean_accuracy": m.clean_accuracy,
                "attack_success_rate": m.attack_success_rate,
                "robust_accuracy": m.robust_accuracy,
                "per_class_accuracy": m.per_class_accuracy,
                "per_class_attack_success_rate": m.per_class_asr,
                "n_attack": m.n_attack,
            },
        });
        println!("{}", serde_json::to_string_pretty(&doc)?);
        return Ok(EXIT_OK);
    }
    println!(
        "{} on {} ({} test images, {runtime})",
        args.model.display(),
        ds.source,
        m.n_test
    );
    println!("  clean accuracy       {:.4}", m.clean_accuracy);
    if let (Some(asr), Some(ra)) = (m.attack_success_rate, m.robust_accuracy) {
        println!(
            "  attack success rate  {asr:.4}  ({} under {} trigger)",
            m.n_attack.unwrap_or(0),
            args.attack.as_deref().unwrap_or("")
        );
        println!("  robust accuracy      {ra:.4}");
    }
    Ok(EXIT_OK)
}
