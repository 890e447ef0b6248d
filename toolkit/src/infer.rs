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

use crate::error::input_error;
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
    /// Builds a session from ONNX bytes. A model whose IR version is newer than the loaded
    /// onnxruntime supports is loaded with its IR version lowered (said on stderr); a model that
    /// onnxruntime refuses is diagnosed by the engine first, so an invalid model is an input error
    /// naming the node (exit 2), not onnxruntime's internal text.
    pub fn from_bytes(bytes: &[u8]) -> Result<OrtModel> {
        let env = ort_env().context("onnxruntime is not available")?;
        let commit = |bytes: &[u8]| {
            ort::session::Session::builder(env)
                .and_then(|mut b| b.commit_from_memory(bytes))
                .map_err(|e| e.to_string())
        };
        let session = match commit(bytes) {
            Ok(s) => s,
            Err(msg) => match unsupported_ir_version(&msg) {
                Some((have, max)) => {
                    let lowered = with_ir_version(bytes, max)?;
                    eprintln!(
                        "note: the model's IR version {have} is newer than this onnxruntime supports ({max}); loading it as IR version {max}"
                    );
                    commit(&lowered).map_err(|msg| load_failure(bytes, &msg))?
                }
                None => return Err(load_failure(bytes, &msg)),
            },
        };
        let names: Vec<String> = session.inputs().iter().map(|i| i.name().to_string()).collect();
        check_one_input(&names)?;
        Ok(OrtModel {
            session,
            input: names[0].clone(),
        })
    }

    /// Runs a float batch (flat NCHW values and shape); returns the first output's shape and values.
    pub fn run(&mut self, x: Vec<f32>, shape: &[i64]) -> Result<(Vec<i64>, Vec<f32>)> {
        let tensor =
            ort::value::Tensor::from_array((shape.to_vec(), x)).map_err(|e| anyhow!("onnxruntime input: {e}"))?;
        let outputs = self
            .session
            .run(ort::inputs![self.input.as_str() => tensor])
            .map_err(|e| anyhow!("onnxruntime run failed: {}", clean_runtime_message(&e.to_string())))?;
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
            .map_err(|e| load_failure_with(bytes, "tract", &format!("{e:#}")))?;
        if model.inputs.is_empty() {
            bail!("tract could not load the model: it has no input");
        }
        let names: Vec<String> = model.inputs.iter().map(|o| model.nodes[o.node].name.clone()).collect();
        check_one_input(&names)?;
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

/// Classifiers take one image input: two or more is an input error naming them.
fn check_one_input(names: &[String]) -> Result<()> {
    match names.len() {
        1 => Ok(()),
        0 => Err(input_error("the model has no input")),
        n => Err(input_error(format!(
            "the model has {n} inputs ({}); audit runs classifiers with one image input",
            names.iter().map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", ")
        ))),
    }
}

/// `(model's IR version, most this onnxruntime supports)` from onnxruntime's refusal.
fn unsupported_ir_version(msg: &str) -> Option<(i64, i64)> {
    let rest = &msg[msg.find("Unsupported model IR version: ")? + "Unsupported model IR version: ".len()..];
    let have: i64 = rest.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()?;
    let max_at = rest.find("max supported IR version: ")? + "max supported IR version: ".len();
    let max: i64 = rest[max_at..]
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()?;
    (max > 0 && max < have).then_some((have, max))
}

/// The same model with its IR version set to `ir` (in memory; the file is not touched).
fn with_ir_version(bytes: &[u8], ir: i64) -> Result<Vec<u8>> {
    use audit_nn::prost::Message;
    let mut proto = audit_nn::model::parse(bytes).map_err(|e| input_error(e.to_string()))?;
    proto.ir_version = Some(ir);
    Ok(proto.encode_to_vec())
}

/// Why onnxruntime could not load `bytes`: the engine's diagnosis (an input error naming the node,
/// exit 2) when it finds the model invalid, else onnxruntime's message, cleaned.
fn load_failure(bytes: &[u8], msg: &str) -> anyhow::Error {
    load_failure_with(bytes, "onnxruntime", msg)
}

fn load_failure_with(bytes: &[u8], runtime: &str, msg: &str) -> anyhow::Error {
    match engine_diagnosis(bytes) {
        Some(e) => {
            anyhow::Error::new(e).context(format!("{runtime} could not load the model, and the engine says why"))
        }
        None => anyhow!("{runtime} could not load the model: {}", clean_runtime_message(msg)),
    }
}

/// The engine's verdict on a model a runtime refused: its loader's error (unsupported op, cycle,
/// dangling input, bad attribute, no output), or a node error from one forward pass on a blank
/// image (shape mismatches). `None` when the engine finds nothing wrong or cannot tell.
pub fn engine_diagnosis(bytes: &[u8]) -> Option<audit_nn::NnError> {
    let model = match audit_nn::Model::load(bytes, None) {
        Err(audit_nn::NnError::Other(_)) => return None,
        Err(e) => return Some(e),
        Ok(m) => m,
    };
    let dims = &model.inputs.first()?.dims;
    let [_, Some(c), Some(h), Some(w)] = dims[..] else {
        return None;
    };
    if c.checked_mul(h)?.checked_mul(w)? > crate::engine::MAX_IMAGE_ELEMS {
        return None;
    }
    match model.predict_f32(&vec![0.0; (c * h * w) as usize], &[1, c, h, w]) {
        Err(e @ audit_nn::NnError::Node { .. }) => Some(e),
        _ => None,
    }
}

/// A runtime's message as we print it: no ANSI colour codes, no source paths of the runtime's own
/// build (`/onnxruntime_src/.../model.cc:256`) and no C++ signatures after them.
pub fn clean_runtime_message(msg: &str) -> String {
    // ANSI escape sequences: ESC [ params letter.
    let mut plain = String::with_capacity(msg.len());
    let mut chars = msg.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                for d in chars.by_ref() {
                    if d.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            continue;
        }
        plain.push(c);
    }
    let is_source = |w: &str| {
        let w = w.trim_matches(|c: char| c == '(' || c == ')' || c == ',' || c == '"' || c == '\'');
        let (file, line) = match w.rsplit_once(':') {
            Some((f, l)) if !l.is_empty() && l.chars().all(|c| c.is_ascii_digit()) => (f, true),
            _ => (w, false),
        };
        let ext = [".cc", ".cpp", ".h", ".hpp", ".c", ".rs"]
            .iter()
            .any(|e| file.ends_with(e));
        ext && (line || file.contains('/'))
    };
    let mut out: Vec<String> = Vec::new();
    for line in plain.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        let mut kept: Vec<&str> = Vec::new();
        let mut i = 0;
        while i < words.len() {
            if is_source(words[i]) {
                i += 1;
                // A C++ signature follows onnxruntime's source locations: skip to its closing
                // parenthesis (`Model::Model(onnx::ModelProto&&, ...)`), then a `const` if any.
                if words.get(i).is_some_and(|w| w.contains("::") && w.contains('(')) {
                    let mut depth = 0i32;
                    while i < words.len() {
                        depth += words[i].matches('(').count() as i32 - words[i].matches(')').count() as i32;
                        i += 1;
                        if depth <= 0 {
                            break;
                        }
                    }
                    if words.get(i) == Some(&"const") {
                        i += 1;
                    }
                }
                continue;
            }
            kept.push(words[i]);
            i += 1;
        }
        if !kept.is_empty() {
            out.push(kept.join(" "));
        }
    }
    out.join("\n")
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
mod message_tests {
    use super::*;

    #[test]
    fn finding_12_runtime_messages_lose_source_paths_and_colours() {
        let m = "/onnxruntime_src/onnxruntime/core/graph/model.cc:256 onnxruntime::Model::Model(onnx::ModelProto&&, const onnxruntime::PathString&, const onnxruntime::logging::Logger&, const onnxruntime::ModelOptions&) Unsupported model IR version: 14, max supported IR version: 13";
        assert_eq!(
            clean_runtime_message(m),
            "Unsupported model IR version: 14, max supported IR version: 13"
        );
        assert_eq!(unsupported_ir_version(m), Some((14, 13)));
        assert_eq!(
            unsupported_ir_version("Unsupported model IR version: 9, max supported IR version: 13"),
            None
        );
        assert_eq!(unsupported_ir_version("something else"), None);
        let coloured = "\u{1b}[1;31m2026-01-01 [E:onnxruntime:, inference_session.cc:2544 operator()] bad\u{1b}[m";
        let c = clean_runtime_message(coloured);
        assert!(
            !c.contains('\u{1b}') && !c.contains("inference_session.cc") && c.ends_with("bad"),
            "{c}"
        );
        let keep = "Invalid model. Node input 'z' is not a graph input";
        assert_eq!(clean_runtime_message(keep), keep);
    }

    #[test]
    fn finding_12_two_inputs_are_an_input_error() {
        let e = check_one_input(&["a".into(), "b".into()]).unwrap_err();
        assert_eq!(crate::error::exit_code(&e), 2);
        assert!(e.to_string().contains("2 inputs (`a`, `b`)"), "{e}");
        assert!(check_one_input(&["a".into()]).is_ok());
    }
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
