//! Glue between the CLI and the engine (audit-nn): loading model files with clear errors,
//! input shapes, and the engine-vs-runtime parity check (onnxruntime, with tract as second opinion
//! and fallback) that guards every export.

use std::path::Path;

use anyhow::{Context, Result};
use audit_nn::Model;

use crate::error::{input_error, input_error_hint};
use crate::infer::{load_runtime, max_rel_diff, RuntimeChoice};

/// Parity tolerance for exports: max |engine - runtime| / max |runtime|, for onnxruntime and tract.
pub const PARITY_TOLERANCE: f64 = 1e-4;

/// Reads a model file for every consumer (exit 2 naming the file when missing, too large or
/// invalid): at most `AUDIT_MAX_INPUT_BYTES`, with external data read beside the model file and
/// inlined, so the engine, onnxruntime, tract and plugins all get the same self-contained bytes.
pub fn read_model(path: &Path) -> Result<Vec<u8>> {
    let bytes = read_input_file(path)?;
    audit_nn::model::with_external_data_inlined(bytes, audit_nn::model::model_dir(path))
        .map_err(|e| input_error(format!("{}: {e}", path.display())))
}

/// Reads any input file with the size limit (exit 2 naming the file; the hint says how to raise
/// the limit).
pub fn read_input_file(path: &Path) -> Result<Vec<u8>> {
    audit_nn::limits::read_file(path).map_err(|e| match e {
        audit_nn::limits::ReadError::TooLarge { .. } => {
            input_error_hint(format!("{}: {e}", path.display()), audit_nn::limits::raise_hint())
        }
        audit_nn::limits::ReadError::Io(_) => input_error(format!("{}: {e}", path.display())),
    })
}

/// Loads a model for the engine (errors name the file, and op/node/opset when unsupported).
pub fn load_model(path: &Path) -> Result<Model> {
    let bytes = read_model(path)?;
    Model::load(&bytes, Some(audit_nn::model::model_dir(path))).with_context(|| format!("loading {}", path.display()))
}

/// Most elements one input image may have for the seeded batches of parity checks (16 Mi, so a
/// batch of 4 stays at 256 MiB of floats).
pub const MAX_IMAGE_ELEMS: i64 = 1 << 24;

/// C, H, W of the model's first input, from the graph (`override_chw` wins).
pub fn input_chw(model: &Model, override_chw: Option<[i64; 3]>) -> Result<[i64; 3]> {
    let checked = |chw: [i64; 3]| -> Result<[i64; 3]> {
        let n = chw.iter().try_fold(1i64, |a, &d| a.checked_mul(d));
        match n {
            Some(n) if n > 0 && n <= MAX_IMAGE_ELEMS => Ok(chw),
            _ => Err(input_error(format!(
                "input `{}`: an image of {}x{}x{} is more than {MAX_IMAGE_ELEMS} values; refusing to build a test batch that size (pass --input CxHxW)",
                model.inputs.first().map_or("?", |i| i.name.as_str()),
                chw[0],
                chw[1],
                chw[2]
            ))),
        }
    };
    if let Some(chw) = override_chw {
        return checked(chw);
    }
    let Some(first) = model.inputs.first() else {
        return Err(input_error("the model has no input"));
    };
    let dims = &first.dims;
    match dims[..] {
        [_, Some(c), Some(h), Some(w)] => checked([c, h, w]),
        _ => Err(input_error(format!(
            "input `{}` has shape {:?}; pass --input CxHxW",
            first.name,
            dims.iter()
                .map(|d| d.map_or("?".to_string(), |v| v.to_string()))
                .collect::<Vec<_>>()
        ))),
    }
}

/// A seeded uniform [0, 1) batch.
pub fn random_batch(n: usize, chw: [i64; 3], seed: u64) -> Vec<f32> {
    let len = n * (chw[0] * chw[1] * chw[2]) as usize;
    let mut state = seed ^ 0x9e37_79b9_7f4a_7c15;
    (0..len)
        .map(|_| {
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            ((z ^ (z >> 31)) >> 40) as f32 / (1u64 << 24) as f32
        })
        .collect()
}

/// Runs `x` through the engine and through onnxruntime on `bytes`; returns max_rel_diff.
pub fn parity(model: &Model, bytes: &[u8], x: &[f32], shape: &[i64]) -> Result<f64> {
    parity_in(model, bytes, RuntimeChoice::Onnxruntime, x, shape).map(|(_, diff)| diff)
}

/// Runs `x` through the engine and through the chosen runtime on `bytes`; returns the runtime
/// that ran (`Auto` picks) and max_rel_diff.
pub fn parity_in(
    model: &Model,
    bytes: &[u8],
    runtime: RuntimeChoice,
    x: &[f32],
    shape: &[i64],
) -> Result<(&'static str, f64)> {
    let (_, ours) = model.predict_f32(x, shape)?;
    let mut rt = load_runtime(bytes, runtime)?;
    let (_, theirs) = rt.run(x.to_vec(), shape)?;
    // Equal NaNs would compare as "no difference": a model that outputs NaN or inf is refused.
    if let Some(bad) = ours.iter().chain(&theirs).find(|v| !v.is_finite()) {
        anyhow::bail!(
            "the model's outputs are not finite ({bad} on a seeded test batch): its weights diverged; refusing it"
        );
    }
    Ok((rt.name(), max_rel_diff(&ours, &theirs)))
}

fn check_diff(runtime: &str, diff: f64) -> Result<()> {
    if diff > PARITY_TOLERANCE {
        anyhow::bail!(
            "export failed its parity check: {runtime} differs from the engine by {diff:.3e} (relative), above {PARITY_TOLERANCE:e}"
        );
    }
    Ok(())
}

/// Exports the model with metadata and refuses to hand back an export that onnxruntime (tract when
/// onnxruntime cannot be loaded) does not reproduce within [`PARITY_TOLERANCE`] on a seeded batch.
/// After onnxruntime, tract checks it too; a model tract cannot run is noted, not refused.
pub fn export_checked(model: &Model, metadata: &[(String, String)], chw: [i64; 3]) -> Result<Vec<u8>> {
    let bytes = model.export(metadata)?;
    let shape = [4, chw[0], chw[1], chw[2]];
    let x = random_batch(4, chw, 1234);
    let (runtime, diff) = parity_in(model, &bytes, RuntimeChoice::Auto, &x, &shape)?;
    check_diff(runtime, diff)?;
    if runtime != "tract" {
        match parity_in(model, &bytes, RuntimeChoice::Tract, &x, &shape) {
            Ok((_, diff)) => check_diff("tract", diff)?,
            Err(e) => eprintln!("note: tract could not check the export ({e:#}); onnxruntime did"),
        }
    }
    Ok(bytes)
}
