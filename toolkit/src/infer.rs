//! Inference on the exported artifact, for evaluation and parity checks: onnxruntime (loaded
//! dynamically; see `runtime`) and tract (pure Rust), the fallback when onnxruntime cannot be
//! loaded and the second opinion in parity checks. Both sit behind [`InferenceRuntime`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use anyhow::{anyhow, bail, Context, Result};
use tract_linalg::multithread::Executor;
use tract_onnx::prelude::{
    tract_ndarray, DatumExt, Framework, InferenceFact, InferenceModel, InferenceModelExt, IntoTensor, RunOptions,
    TValue, TVec, TypedRunnableModel,
};
use tract_onnx::tract_hir::ops::unimpl::UnimplementedOp;

use crate::runtime::ort_env;

/// One model loaded in an inference runtime: runs float NCHW batches, returns the first output.
pub trait InferenceRuntime {
    /// `onnxruntime` or `tract`, as reports name it.
    fn name(&self) -> &'static str;

    /// Runs a float batch (flat NCHW values and shape); returns the first output's shape and values.
    fn run(&mut self, x: Vec<f32>, shape: &[i64]) -> Result<(Vec<i64>, Vec<f32>)>;
}

/// Which runtime to evaluate with (`--runtime`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum RuntimeChoice {
    /// onnxruntime when its library loads, else tract (with a note on stderr).
    #[default]
    Auto,
    /// onnxruntime only; an error when its library cannot be loaded.
    Onnxruntime,
    /// tract (pure Rust) only.
    Tract,
}

/// Loads `bytes` in the chosen runtime. `Auto` takes onnxruntime when its library loads, else
/// tract, saying so on stderr once per process.
pub fn load_runtime(bytes: &[u8], choice: RuntimeChoice) -> Result<Box<dyn InferenceRuntime>> {
    match choice {
        RuntimeChoice::Onnxruntime => Ok(Box::new(OrtModel::from_bytes(bytes)?)),
        RuntimeChoice::Tract => Ok(Box::new(TractModel::from_bytes(bytes)?)),
        RuntimeChoice::Auto => match ort_env() {
            Ok(_) => Ok(Box::new(OrtModel::from_bytes(bytes)?)),
            Err(e) => {
                static NOTED: AtomicBool = AtomicBool::new(false);
                if !NOTED.swap(true, Ordering::Relaxed) {
                    eprintln!("note: onnxruntime is not available ({e:#}); using tract instead");
                }
                Ok(Box::new(TractModel::from_bytes(bytes)?))
            }
        },
    }
}

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
        let env = ort_env().context("onnxruntime is not available")?;
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

impl InferenceRuntime for OrtModel {
    fn name(&self) -> &'static str {
        "onnxruntime"
    }

    fn run(&mut self, x: Vec<f32>, shape: &[i64]) -> Result<(Vec<i64>, Vec<f32>)> {
        OrtModel::run(self, x, shape)
    }
}

/// tract's thread pool, one per process, one thread per CPU.
fn tract_executor() -> Executor {
    static POOL: OnceLock<Executor> = OnceLock::new();
    POOL.get_or_init(|| Executor::multithread(std::thread::available_parallelism().map_or(1, |n| n.get())))
        .clone()
}

/// A tract model: parsed once, then typed and optimised for each distinct input shape it is run
/// with (an evaluation sees two: the full batch and the last, smaller one), the plans cached.
pub struct TractModel {
    model: InferenceModel,
    plans: HashMap<Vec<usize>, Arc<TypedRunnableModel>>,
}

impl std::fmt::Debug for TractModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TractModel")
            .field("plans", &self.plans.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl TractModel {
    /// Parses ONNX bytes (external data is not supported, as with onnxruntime from bytes).
    pub fn from_bytes(bytes: &[u8]) -> Result<TractModel> {
        let model = tract_onnx::onnx()
            .model_for_read(&mut &bytes[..])
            .map_err(|e| anyhow!("tract could not load the model: {e:#}"))?;
        if model.inputs.is_empty() {
            bail!("tract could not load the model: it has no input");
        }
        if model.outputs.is_empty() {
            bail!("tract could not load the model: it has no output");
        }
        let unsupported: Vec<String> = model
            .nodes
            .iter()
            .filter(|n| n.op_as::<UnimplementedOp>().is_some())
            .map(|n| {
                let op = n.op().name();
                let op = op
                    .strip_prefix("Unimplemented(")
                    .and_then(|o| o.strip_suffix(')'))
                    .unwrap_or(&op);
                format!("{op} (node `{}`)", n.name)
            })
            .collect();
        if !unsupported.is_empty() {
            bail!(
                "tract could not load the model: unsupported operator(s): {}",
                unsupported.join(", ")
            );
        }
        Ok(TractModel {
            model,
            plans: HashMap::new(),
        })
    }

    /// The runnable for one concrete input shape: the first input fixed to f32 `shape`.
    fn plan(&mut self, shape: &[usize]) -> Result<Arc<TypedRunnableModel>> {
        if let Some(p) = self.plans.get(shape) {
            return Ok(p.clone());
        }
        let plan = (|| {
            let mut m = self.model.clone();
            let fact: InferenceFact = f32::fact(shape).into();
            m.set_input_fact(0, fact)?;
            let options = RunOptions {
                executor: Some(tract_executor()),
                ..Default::default()
            };
            m.into_optimized()?.into_runnable_with_options(&options)
        })()
        .map_err(|e: anyhow::Error| anyhow!("tract could not prepare the model for input shape {shape:?}: {e:#}"))?;
        self.plans.insert(shape.to_vec(), plan.clone());
        Ok(plan)
    }
}

impl InferenceRuntime for TractModel {
    fn name(&self) -> &'static str {
        "tract"
    }

    fn run(&mut self, x: Vec<f32>, shape: &[i64]) -> Result<(Vec<i64>, Vec<f32>)> {
        let dims: Vec<usize> = shape
            .iter()
            .map(|&d| usize::try_from(d).map_err(|_| anyhow!("tract input: negative dimension in {shape:?}")))
            .collect::<Result<_>>()?;
        let plan = self.plan(&dims)?;
        let input = tract_ndarray::ArrayD::from_shape_vec(tract_ndarray::IxDyn(&dims), x)
            .map_err(|e| anyhow!("tract input: {e}"))?
            .into_tensor();
        let outputs = plan
            .run(TVec::<TValue>::from_elem(input.into(), 1))
            .map_err(|e| anyhow!("tract run failed: {e:#}"))?;
        let out = outputs.first().context("tract: the model produced no output")?;
        let out = out.cast_to::<f32>().map_err(|e| anyhow!("tract output: {e:#}"))?;
        let view = out
            .to_plain_array_view::<f32>()
            .map_err(|e| anyhow!("tract output: {e:#}"))?;
        Ok((
            view.shape().iter().map(|&d| d as i64).collect(),
            view.iter().copied().collect(),
        ))
    }
}

/// max|a - b| / max(max|b|, 1e-6): the parity measure used everywhere.
pub fn max_rel_diff(a: &[f32], b: &[f32]) -> f64 {
    let scale = b.iter().fold(0f64, |m, &v| m.max(v.abs() as f64)).max(1e-6);
    let diff = a
        .iter()
        .zip(b)
        .fold(0f64, |m, (&x, &y)| m.max((x as f64 - y as f64).abs()));
    if a.len() != b.len() || a.iter().chain(b).any(|v| !v.is_finite()) {
        return f64::INFINITY;
    }
    diff / scale
}

#[cfg(test)]
mod diff_tests {
    use super::max_rel_diff;

    #[test]
    fn non_finite_outputs_never_pass_as_equal() {
        assert_eq!(max_rel_diff(&[1.0, 2.0], &[1.0, 2.0]), 0.0);
        assert!((max_rel_diff(&[1.0, 2.1], &[1.0, 2.0]) - 0.05).abs() < 1e-6);
        assert_eq!(max_rel_diff(&[f32::NAN], &[f32::NAN]), f64::INFINITY);
        assert_eq!(
            max_rel_diff(&[1.0, f32::INFINITY], &[1.0, f32::INFINITY]),
            f64::INFINITY
        );
        assert_eq!(max_rel_diff(&[1.0], &[1.0, 2.0]), f64::INFINITY);
    }
}
