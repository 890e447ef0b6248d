//! `audit attack NAME --data DATA (--arch ARCH | --model M.onnx) --out OUT.onnx`: poisons the
//! training set with an attack plugin, trains the model on it with the engine, exports it
//! (parity-checked), and measures clean accuracy and attack success on the exported file.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use audit_nn::train::{Augment, DeviceData, Hooks, Optimizer, Preprocess, Schedule, TrainConfig, Trainer};
use audit_nn::Model;
use clap::Args;
use serde_json::json;

use super::args::{DataArgs, DeviceArg, OptimizerArg};
use super::GlobalArgs;
use crate::data::{self, LabeledSet, NpzArray, Pixels};
use crate::engine::{export_checked, read_model};
use crate::error::{input_error, EXIT_OK};
use crate::evaluate::{evaluate, AttackSpec, Normalization};
use crate::output::Outputs;
use crate::plugin::{CallInput, Kind, Op, PluginError};

/// How to train (shared by commands that train).
#[derive(Debug, Args, Clone)]
pub struct TrainArgs {
    #[arg(long, default_value_t = 2)]
    pub epochs: usize,
    #[arg(long, default_value_t = 128)]
    pub batch_size: i64,
    #[arg(long, default_value_t = 0.01)]
    pub lr: f64,
    #[arg(long, default_value_t = 5e-4)]
    pub weight_decay: f64,
    /// sgd (momentum 0.9) or adam.
    #[arg(long, value_enum, default_value = "sgd")]
    pub optimizer: OptimizerArg,
    /// Random crop padding and horizontal flip (off by default; CIFAR-style data wants `--augment`).
    #[arg(long)]
    pub augment: bool,
    /// auto (CUDA when available), cpu or cuda.
    #[arg(long, value_enum, default_value = "auto")]
    pub device: DeviceArg,
}

impl TrainArgs {
    /// The engine's training configuration.
    pub fn config(&self, seed: u64) -> TrainConfig {
        TrainConfig {
            epochs: self.epochs,
            batch_size: self.batch_size,
            lr: self.lr,
            weight_decay: self.weight_decay,
            optimizer: match self.optimizer {
                OptimizerArg::Adam => Optimizer::adam(),
                OptimizerArg::Sgd => Optimizer::sgd(0.9),
            },
            schedule: Schedule::Cosine { min_lr: 0.0 },
            freeze_bn: false,
            augment: Augment::crop_flip(self.augment),
            seed,
            group_lr: vec![],
        }
    }

    /// The tch device.
    pub fn device(&self) -> Result<audit_nn::tch::Device> {
        Ok(self.device.resolve()?.0)
    }
}

#[derive(Debug, Args)]
pub struct AttackArgs {
    /// Attack plugin name (see `audit plugins list`).
    pub name: String,
    #[command(flatten)]
    pub data: DataArgs,
    /// Train a fresh model of this architecture (see `audit zoo --help`).
    #[arg(long, conflicts_with = "model")]
    pub arch: Option<String>,
    /// Train this ONNX model (fine-tuned from its weights).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Where to write the backdoored model.
    #[arg(long)]
    pub out: PathBuf,
    /// Also write the poisoned training set (NPZ with x_train, y_train, x_test, y_test, poison_idx).
    #[arg(long)]
    pub poisoned_data: Option<PathBuf>,
    /// Attack parameter KEY=VALUE (repeatable).
    #[arg(long = "param", value_name = "KEY=VALUE")]
    pub params: Vec<String>,
    #[command(flatten)]
    pub train: TrainArgs,
    /// Train on the first N training samples only.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Evaluate on the first N test samples only.
    #[arg(long)]
    pub test_limit: Option<usize>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Replace existing output files.
    #[arg(long)]
    pub force: bool,
    #[arg(long)]
    pub json: bool,
}

/// A labelled set as device data for the engine.
pub fn device_data(set: &LabeledSet, device: audit_nn::tch::Device) -> DeviceData {
    let im = &set.images;
    let shape = [im.n as i64, im.c as i64, im.h as i64, im.w as i64];
    match &im.pixels {
        Pixels::U8(v) => DeviceData::from_u8(v, shape, &set.labels, device),
        Pixels::F32(v) => DeviceData::from_f32(v, shape, &set.labels, device),
    }
}

/// Trains `model` for `cfg.epochs` with progress on stderr; returns per-epoch stats.
pub fn train_epochs(
    model: &Model,
    data: &DeviceData,
    norm: &Normalization,
    cfg: TrainConfig,
    label: &str,
) -> Result<Vec<audit_nn::train::EpochStats>> {
    let pre = Preprocess {
        mean: norm.mean.iter().map(|&x| x as f64).collect(),
        std: norm.std.iter().map(|&x| x as f64).collect(),
    };
    let epochs = cfg.epochs;
    let mut trainer = Trainer::new(model, cfg)?;
    let progress = crate::progress::Progress::default();
    let mut stats = Vec::new();
    for e in 0..epochs {
        let phase = format!("{label} epoch {}/{epochs}", e + 1);
        let mut hooks = Hooks {
            progress: Box::new(|_, done, total| progress.update("train", &phase, done, total)),
            cancelled: Box::new(crate::signals::is_cancelled),
        };
        let s = trainer.epoch(model, data, &pre, &mut hooks).map_err(|e| {
            if crate::signals::is_cancelled() {
                anyhow::anyhow!("cancelled by the user")
            } else {
                anyhow::Error::new(e)
            }
        })?;
        progress.finish();
        eprintln!(
            "{phase}: loss {:.4}, train accuracy {:.4} ({:.1}s, {:.0} img/s)",
            s.loss,
            s.accuracy,
            s.seconds,
            s.samples as f64 / s.seconds
        );
        stats.push(s);
    }
    Ok(stats)
}

/// The initial model: a fresh zoo architecture or a file.
pub fn initial_model(
    arch: Option<&str>,
    model: Option<&Path>,
    chw: [i64; 3],
    classes: usize,
    seed: u64,
) -> Result<(Vec<u8>, String)> {
    match (arch, model) {
        (Some(a), None) => {
            let arch: audit_nn::zoo::Arch = a.parse().map_err(|e: String| input_error(e))?;
            let proto = audit_nn::zoo::build(arch, chw, classes as i64, seed)
                .map_err(|e| input_error(format!("--arch {a}: {e}")))?;
            Ok((audit_nn::zoo::to_bytes(&proto), format!("zoo:{a}")))
        }
        (None, Some(p)) => Ok((read_model(p)?, p.display().to_string())),
        _ => Err(input_error("give exactly one of --arch ARCH or --model MODEL.onnx")),
    }
}

pub fn run(args: AttackArgs, global: &GlobalArgs) -> Result<i32> {
    let started = std::time::Instant::now();
    let mut inputs: Vec<&Path> = args.model.iter().map(PathBuf::as_path).collect();
    let data_path = Path::new(&args.data.data);
    if data_path.exists() {
        inputs.push(data_path);
    }
    let mut outputs = Outputs::new(args.force, &inputs);
    outputs.plan("--out", &args.out)?;
    if let Some(p) = &args.poisoned_data {
        outputs.plan("--poisoned-data", p)?;
    }
    let dirs = crate::plugin::search_dirs(&global.plugin_dirs);
    let plugin = super::plugins::find(&dirs, &args.name)?;
    if plugin.kind != Kind::Attack {
        return Err(input_error(format!(
            "`{}` is a {} plugin, not an attack",
            plugin.name, plugin.kind
        )));
    }
    let params = plugin
        .schema
        .resolve_args(&args.params)
        .map_err(|e| PluginError::InvalidInput {
            name: plugin.name.clone(),
            path: plugin.path.clone(),
            message: e.to_string(),
        })?;
    crate::signals::phase("attack:load");
    let ds = args.data.load(args.seed)?;
    let train = match args.limit {
        Some(k) => ds.train.head(k),
        None => ds.train.clone(),
    };
    let test = match args.test_limit {
        Some(k) => ds.test.head(k),
        None => ds.test.clone(),
    };
    let chw = [train.images.c as i64, train.images.h as i64, train.images.w as i64];
    let (model_bytes, source) = initial_model(
        args.arch.as_deref(),
        args.model.as_deref(),
        chw,
        ds.num_classes,
        args.seed,
    )?;
    let mut model = Model::load(&model_bytes, args.model.as_deref().and_then(Path::parent))
        .with_context(|| format!("loading {source}"))?;
    crate::evaluate::check_model_fits_data(&model_bytes, &source, &ds)?;
    let meta = |k: &str| model.metadata(k).map(str::to_string);
    let norm = args.data.options.normalization(&meta)?;

    crate::signals::phase("attack:train");
    eprintln!("poisoning {} training samples with `{}`", train.len(), plugin.name);
    let poisoned = plugin.call(&CallInput {
        op: Op::Poison,
        params: &params,
        seed: args.seed,
        device: "cpu",
        model: None,
        data: Some(&train),
        clean: None,
        num_classes: ds.num_classes,
    })?;
    let (images, labels, idx) = (
        poisoned.images.context("poison returned no images")?,
        poisoned.labels.context("poison returned no labels")?,
        poisoned.indices.unwrap_or_default(),
    );
    let poisoned_set = LabeledSet { images, labels };

    let device = args.train.device()?;
    model.to_device(device);
    let data = device_data(&poisoned_set, device);
    let stats = train_epochs(&model, &data, &norm, args.train.config(args.seed), "attack")?;

    let mut metadata = vec![
        ("audit.attack".to_string(), plugin.name.clone()),
        (
            "audit.attack_params".to_string(),
            serde_json::Value::Object(params.clone()).to_string(),
        ),
        ("audit.seed".to_string(), args.seed.to_string()),
        ("audit.source".to_string(), source.clone()),
        (
            "audit.toolkit_version".to_string(),
            env!("CARGO_PKG_VERSION").to_string(),
        ),
    ];
    if args.model.is_some() {
        metadata.push((
            "audit.source_sha256".to_string(),
            audit_nn::export::sha256_hex(&model_bytes),
        ));
    }
    metadata.extend(norm.metadata());
    let out_bytes = export_checked(&model, &metadata, chw)?;
    crate::signals::phase("attack:write");
    outputs.stage(&args.out, &out_bytes)?;
    if let Some(p) = &args.poisoned_data {
        outputs.stage_with(p, |f| {
            data::write_npz_to(
                f,
                p,
                &[
                    ("x_train", NpzArray::Images(&poisoned_set.images)),
                    ("y_train", NpzArray::I64(&poisoned_set.labels)),
                    ("x_test", NpzArray::Images(&ds.test.images)),
                    ("y_test", NpzArray::I64(&ds.test.labels)),
                    ("poison_idx", NpzArray::I64(&idx)),
                ],
            )
        })?;
    }
    let spec = AttackSpec {
        plugin: &plugin,
        params: &params,
        seed: args.seed,
    };
    let m = evaluate(&out_bytes, &test, ds.num_classes, &norm, Some(&spec))?;
    crate::signals::phase("attack:commit");
    outputs.commit()?;
    let seconds = started.elapsed().as_secs_f64();
    if args.json {
        let doc = json!({
            "schema_version": 1,
            "attack": plugin.name,
            "version": plugin.version,
            "library": plugin.path.display().to_string(),
            "sha256": plugin.sha256,
            "params": params,
            "output": args.out.display().to_string(),
            "poisoned_data": args.poisoned_data.as_ref().map(|p| p.display().to_string()),
            "source": source,
            "device": format!("{device:?}").to_lowercase(),
            "n_train": poisoned_set.len(),
            "n_poisoned": idx.len(),
            "epochs": stats.iter().map(|s| json!({"loss": s.loss, "train_accuracy": s.accuracy, "seconds": s.seconds})).collect::<Vec<_>>(),
            "seconds": seconds,
            "metrics": {
                "clean_accuracy": m.clean_accuracy,
                "attack_success_rate": m.attack_success_rate,
                "robust_accuracy": m.robust_accuracy,
                "per_class_accuracy": m.per_class_accuracy,
                "n_test": m.n_test,
            },
        });
        println!("{}", serde_json::to_string_pretty(&doc)?);
        return Ok(EXIT_OK);
    }
    println!(
        "wrote {} ({} trained on {} samples, {} poisoned by {}) in {seconds:.1}s",
        args.out.display(),
        source,
        poisoned_set.len(),
        idx.len(),
        plugin.name
    );
    println!("  clean accuracy       {:.4}", m.clean_accuracy);
    println!(
        "  attack success rate  {:.4}",
        m.attack_success_rate.unwrap_or(f64::NAN)
    );
    println!("  robust accuracy      {:.4}", m.robust_accuracy.unwrap_or(f64::NAN));
    if let Some(p) = &args.poisoned_data {
        println!("  poisoned training set: {}", p.display());
    }
    Ok(EXIT_OK)
}
