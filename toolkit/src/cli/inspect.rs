//! `audit inspect MODEL.onnx [--parity] [--json]`: inputs, outputs, opset, parameters, neurons,
//! every unsupported op in one pass, and optionally engine-vs-onnxruntime parity, with tract's as a
//! second opinion.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use serde_json::{json, Value};

use crate::engine::{input_chw, parity, parity_in, random_batch, read_model, PARITY_TOLERANCE};
use crate::error::{exit_code, input_error, EXIT_FAILURE, EXIT_OK, EXIT_USAGE};
use crate::infer::RuntimeChoice;

#[derive(Debug, Args)]
pub struct InspectArgs {
    pub model: PathBuf,
    /// Compare the engine with onnxruntime, and with tract, on a seeded random batch.
    #[arg(long)]
    pub parity: bool,
    /// Input size when the model's is symbolic, e.g. 3x32x32.
    #[arg(long, value_parser = parse_chw)]
    pub input: Option<[i64; 3]>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long)]
    pub json: bool,
}

/// Parses `CxHxW`.
pub fn parse_chw(s: &str) -> Result<[i64; 3], String> {
    let v: Vec<i64> = s
        .split('x')
        .map(|p| p.trim().parse::<i64>())
        .collect::<Result<_, _>>()
        .map_err(|_| format!("`{s}`: expected CxHxW, e.g. 1x28x28"))?;
    match v[..] {
        [c, h, w] if c > 0 && h > 0 && w > 0 && c <= 64 && h <= 4096 && w <= 4096 => Ok([c, h, w]),
        _ => Err(format!("`{s}`: expected CxHxW with positive sizes, e.g. 1x28x28")),
    }
}

fn io_json(io: &[audit_nn::IoInfo]) -> Value {
    io.iter()
        .map(|i| json!({"name": i.name, "elem_type": i.elem_type, "shape": i.dims.iter().map(|d| d.map_or(Value::Null, Value::from)).collect::<Vec<_>>()}))
        .collect()
}

pub fn run(args: InspectArgs) -> Result<i32> {
    let bytes = read_model(&args.model)?;
    let proto = audit_nn::model::parse(&bytes).map_err(|e| input_error(format!("{}: {e}", args.model.display())))?;
    let opset = audit_nn::model::default_opset(&proto);
    let unsupported = audit_nn::model::unsupported_nodes(&proto);
    let unsupported_json: Vec<Value> = unsupported
        .iter()
        .map(|u| json!({"op_type": u.op_type, "node": u.node, "domain": u.domain, "reason": u.reason, "opset": opset}))
        .collect();
    let mut doc = json!({
        "schema_version": 1,
        "model": {"path": args.model.display().to_string(), "sha256": audit_nn::export::sha256_hex(&bytes), "bytes": bytes.len()},
        "producer": format!("{} {}", proto.producer_name(), proto.producer_version()).trim().to_string(),
        "opset": opset,
        "nodes": proto.graph.as_ref().map_or(0, |g| g.node.len()),
        "unsupported_ops": unsupported_json,
        "metadata": proto.metadata_props.iter().map(|e| (e.key().to_string(), Value::from(e.value()))).collect::<serde_json::Map<_, _>>(),
    });
    let loaded = if unsupported.is_empty() {
        Some(audit_nn::Model::from_proto(
            proto,
            Some(audit_nn::model::model_dir(&args.model)),
        ))
    } else {
        None
    };
    // 2 when the engine cannot load the model, 1 when parity cannot run or is above tolerance.
    let mut code = match &loaded {
        Some(Ok(_)) => EXIT_OK,
        _ => EXIT_USAGE,
    };
    match &loaded {
        Some(Ok(model)) => {
            doc["inputs"] = io_json(&model.inputs);
            doc["outputs"] = io_json(&model.outputs);
            doc["parameters"] = json!(model.parameter_count());
            doc["neuron_layers"] = model
                .layers()
                .iter()
                .map(|l| json!({"node": l.node, "op_type": l.op_type, "output": l.value_name, "neurons": l.channels, "monitored": !l.is_output}))
                .collect();
        }
        Some(Err(e)) => doc["load_error"] = json!(e.to_string()),
        None => {}
    }
    if args.parity {
        match &loaded {
            Some(Ok(model)) => {
                let chw = input_chw(model, args.input)?;
                let shape = [4, chw[0], chw[1], chw[2]];
                let x = random_batch(4, chw, args.seed);
                match parity(model, &bytes, &x, &shape) {
                    Ok(diff) => {
                        let tract = match parity_in(model, &bytes, RuntimeChoice::Tract, &x, &shape) {
                            Ok((_, d)) => {
                                if d > PARITY_TOLERANCE {
                                    code = code.max(EXIT_FAILURE);
                                }
                                json!({"max_rel_diff": d, "ok": d <= PARITY_TOLERANCE})
                            }
                            // tract is the second opinion: a model it cannot run is noted.
                            Err(e) => json!({"error": format!("{e:#}")}),
                        };
                        if diff > PARITY_TOLERANCE {
                            code = code.max(EXIT_FAILURE);
                        }
                        doc["parity"] = json!({"runtime": "onnxruntime", "batch_shape": shape, "max_rel_diff": diff, "tolerance": PARITY_TOLERANCE, "ok": diff <= PARITY_TOLERANCE, "tract": tract});
                    }
                    Err(e) => {
                        code = code.max(exit_code(&e));
                        doc["parity"] = json!({"error": format!("{e:#}")});
                    }
                }
            }
            _ => doc["parity"] = json!({"error": "the engine cannot load this model"}),
        }
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&doc)?);
        return Ok(code);
    }
    println!(
        "{} ({} bytes, sha256 {})",
        args.model.display(),
        bytes.len(),
        &doc["model"]["sha256"].as_str().unwrap_or("")[..16]
    );
    println!(
        "  producer {}  opset {}  nodes {}",
        doc["producer"].as_str().unwrap_or(""),
        opset,
        doc["nodes"]
    );
    if let Some(Ok(model)) = &loaded {
        for (what, io) in [("input ", &model.inputs), ("output", &model.outputs)] {
            for i in io.iter() {
                let dims: Vec<String> = i.dims.iter().map(|d| d.map_or("?".into(), |v| v.to_string())).collect();
                println!("  {what} {} [{}]", i.name, dims.join(", "));
            }
        }
        println!("  trainable parameters {}", model.parameter_count());
        let layers = model.layers();
        println!(
            "  neuron layers {} ({} monitored):",
            layers.len(),
            layers.iter().filter(|l| !l.is_output).count()
        );
        for l in &layers {
            println!(
                "    {:<28} {:<7} {:>5} neurons{}",
                l.node,
                l.op_type,
                l.channels,
                if l.is_output { "  (logits)" } else { "" }
            );
        }
    }
    if let Some(Err(e)) = &loaded {
        println!("  cannot load: {e}");
    }
    if matches!(loaded, Some(Ok(_))) {
        println!("  every op is supported");
    } else if !unsupported.is_empty() {
        println!("  {} unsupported node(s):", unsupported.len());
        for u in &unsupported {
            println!("    {} (node `{}`, opset {opset}): {}", u.op_type, u.node, u.reason);
        }
    }
    if let Some(p) = doc.get("parity") {
        match p.get("max_rel_diff") {
            Some(d) => println!(
                "  parity vs onnxruntime: max_rel_diff {:.3e} ({})",
                d.as_f64().unwrap_or(f64::NAN),
                if p["ok"] == true { "ok" } else { "ABOVE TOLERANCE" }
            ),
            None => println!("  parity: {}", p["error"].as_str().unwrap_or("")),
        }
        if let Some(t) = p.get("tract") {
            match t.get("max_rel_diff") {
                Some(d) => println!(
                    "  parity vs tract:       max_rel_diff {:.3e} ({})",
                    d.as_f64().unwrap_or(f64::NAN),
                    if t["ok"] == true { "ok" } else { "ABOVE TOLERANCE" }
                ),
                None => println!("  parity vs tract: {}", t["error"].as_str().unwrap_or("")),
            }
        }
    }
    Ok(code)
}
