//! Inference through onnxruntime (loaded dynamically; see `runtime`), for evaluation and parity
//! checks on the exported artifact.

use anyhow::{anyhow, Context, Result};

use crate::runtime::ort_env;

/// An onnxruntime session over one model.
pub struct OrtModel {
    session: ort::session::Session,
    input: String,
}

impl std::fmt::Debug for OrtModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OrtModel").field("input", &self.input).finish()
    }
}

impl OrtModel {
    /// Builds a session from ONNX bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<OrtModel> {
        let env = ort_env()?;
        let session = ort::session::Session::builder(env)
            .and_then(|mut b| b.commit_from_memory(bytes))
            .map_err(|e| anyhow!("onnxruntime could not load the model: {e}"))?;
        let input = session
            .inputs()
            .first()
            .map(|i| i.name().to_string())
            .context("the model has no input")?;
        Ok(OrtModel { session, input })
    }

    /// Runs a float batch (flat NCHW values and shape); returns the first output's shape and values.
    pub fn run(&mut self, x: Vec<f32>, shape: &[i64]) -> Result<(Vec<i64>, Vec<f32>)> {
        let tensor =
            ort::value::Tensor::from_array((shape.to_vec(), x)).map_err(|e| anyhow!("onnxruntime input: {e}"))?;
        let outputs = self
            .session
            .run(ort::inputs![self.input.as_str() => tensor])
            .map_err(|e| anyhow!("onnxruntime run failed: {e}"))?;
        let (shape, data) = outputs[0]
            .try_extract_tensor::<f32>()
            .map_err(|e| anyhow!("onnxruntime output: {e}"))?;
        Ok((shape.iter().copied().collect(), data.to_vec()))
    }
}

/// max|a - b| / max(max|b|, 1e-6): the parity measure used everywhere.
pub fn max_rel_diff(a: &[f32], b: &[f32]) -> f64 {
    let scale = b.iter().fold(0f64, |m, &v| m.max(v.abs() as f64)).max(1e-6);
    let diff = a
        .iter()
        .zip(b)
        .fold(0f64, |m, (&x, &y)| m.max((x as f64 - y as f64).abs()));
    if a.len() != b.len() {
        return f64::INFINITY;
    }
    diff / scale
}
