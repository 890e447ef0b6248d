//! Clap argument groups that several commands share (flattened into their own argument types),
//! with the one place that turns them into settings: how a dataset is read and normalised.

use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::{Args, ValueEnum};

use crate::data::{self, DataFormat, Dataset};
use crate::engine::read_model;
use crate::error::input_error;
use crate::evaluate::Normalization;

/// How a dataset is read and normalised (`--data-format`, `--mean`, `--std`).
#[derive(Debug, Args, Clone)]
pub struct DataOptions {
    #[arg(long, value_enum, default_value = "auto")]
    pub data_format: DataFormat,
    /// Per-channel mean (comma-separated) of the preprocessing; default: the model's audit.mean, else 0.
    #[arg(long)]
    pub mean: Option<String>,
    /// Per-channel std; default: the model's audit.std, else 1.
    #[arg(long)]
    pub std: Option<String>,
}

impl DataOptions {
    /// The preprocessing: `--mean`/`--std`, else the model's `audit.mean`/`audit.std` metadata
    /// (`metadata` looks a key up), else 0 and 1.
    pub fn normalization(&self, metadata: &dyn Fn(&str) -> Option<String>) -> Result<Normalization> {
        Normalization::resolve(self.mean.as_deref(), self.std.as_deref(), metadata)
    }

    /// The model file's bytes and its preprocessing ([`DataOptions::normalization`] on the
    /// file's metadata).
    pub fn model_and_normalization(&self, path: &Path) -> Result<(Vec<u8>, Normalization)> {
        let bytes = read_model(path)?;
        let proto = audit_nn::model::parse(&bytes).map_err(|e| input_error(format!("{}: {e}", path.display())))?;
        let meta = |k: &str| {
            proto
                .metadata_props
                .iter()
                .find(|e| e.key() == k)
                .map(|e| e.value().to_string())
        };
        let norm = self.normalization(&meta)?;
        Ok((bytes, norm))
    }

    /// The same options as command-line arguments (for a child `audit` process).
    pub fn to_args(&self) -> Vec<String> {
        let format = self
            .data_format
            .to_possible_value()
            .map_or("auto".to_string(), |v| v.get_name().to_string());
        let mut out = vec!["--data-format".to_string(), format];
        for (flag, v) in [("--mean", &self.mean), ("--std", &self.std)] {
            if let Some(v) = v {
                out.extend([flag.to_string(), v.clone()]);
            }
        }
        out
    }
}

/// A dataset the command needs (`--data`) and how to read it.
#[derive(Debug, Args, Clone)]
pub struct DataArgs {
    /// Dataset: a folder of IDX files, CIFAR-10/100 binary batches or an image folder (train/ and test/ with a folder per class), an NPZ file, `fashion-mnist`, or `synthetic`.
    #[arg(long)]
    pub data: String,
    #[command(flatten)]
    pub options: DataOptions,
}

impl DataArgs {
    /// See [`DataOptions::model_and_normalization`].
    pub fn model_and_normalization(&self, path: &Path) -> Result<(Vec<u8>, Normalization)> {
        self.options.model_and_normalization(path)
    }

    /// Loads the dataset (`seed` orders what is shuffled, such as a synthetic set).
    pub fn load(&self, seed: u64) -> Result<Dataset> {
        Ok(data::load(&self.data, self.options.data_format, seed)?)
    }
}

/// `--device`: where the engine trains and analyses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DeviceArg {
    /// CUDA when it is available, else the CPU.
    Auto,
    Cpu,
    Cuda,
}

impl DeviceArg {
    /// The device this resolves to on this machine, and its name as plugins are told it
    /// (`cpu` or `cuda`); `cuda` without a usable GPU is an input error saying why.
    pub fn resolve(self) -> Result<(audit_nn::tch::Device, &'static str)> {
        let req = match self {
            DeviceArg::Auto => audit_nn::DeviceRequest::Auto,
            DeviceArg::Cpu => audit_nn::DeviceRequest::Cpu,
            DeviceArg::Cuda => audit_nn::DeviceRequest::Cuda,
        };
        let device = audit_nn::resolve_device(req).map_err(|e| input_error(e.to_string()))?;
        Ok((device, if device.is_cuda() { "cuda" } else { "cpu" }))
    }
}

/// `--optimizer` of a training the host runs (`audit attack`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OptimizerArg {
    /// SGD, momentum 0.9.
    Sgd,
    /// Adam, betas 0.9 and 0.999.
    Adam,
}

/// What `harden` and `compare` share: device, evaluation attack, reports, data splits, seed.
#[derive(Debug, Args, Clone)]
pub struct DefenseRunArgs {
    /// auto (CUDA when available), cpu or cuda.
    #[arg(long, value_enum, default_value = "auto")]
    pub device: DeviceArg,
    /// Attack whose trigger measures ASR and robust accuracy before and after.
    #[arg(long)]
    pub eval_attack: Option<String>,
    /// Parameter of the evaluation attack KEY=VALUE (repeatable).
    #[arg(long = "attack-param", value_name = "KEY=VALUE")]
    pub attack_params: Vec<String>,
    /// Also write a report: .json, .md or .html (self-contained, with charts); repeatable.
    #[arg(long = "report", value_name = "FILE")]
    pub reports: Vec<PathBuf>,
    /// Use the first N training samples only.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Measure on the first N test samples only.
    #[arg(long)]
    pub test_limit: Option<usize>,
    /// For defenses that need trusted clean data: the last N test images are lent to the defense
    /// as its clean subset and left out of the evaluation (half the test split, with a warning,
    /// when it cannot spare N).
    #[arg(long, default_value_t = 1000)]
    pub clean_size: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Scan the model before and the hardened model after with the model-level detectors
    /// (default: every installed data-free one, today `mmbd`); both verdicts go in the report, and
    /// `harden` exits 3 when the hardened model is still flagged.
    #[arg(long)]
    pub verify: bool,
    /// A detector for --verify (repeatable; implies --verify), e.g. `nc`, which is lent the first
    /// 1,000 test images as `audit scan` lends them.
    #[arg(long = "verify-detector", value_name = "NAME")]
    pub verify_detectors: Vec<String>,
    /// Parameter of a --verify detector, [DETECTOR:]KEY=VALUE as in `audit scan --param` (repeatable).
    #[arg(long = "verify-param", value_name = "[DETECTOR:]KEY=VALUE")]
    pub verify_params: Vec<String>,
}

impl DefenseRunArgs {
    /// The clean subset's size on a test split of `n_test` images: `--clean-size`, or, when the
    /// split cannot spare that many, half of it (with a warning), so the default fits small data.
    /// 0, or a split too small to halve, is refused.
    pub fn clean_size_for(&self, n_test: usize) -> Result<usize> {
        if self.clean_size == 0 || n_test < 2 {
            return Err(input_error(format!(
                "--clean-size {} on a test split of {n_test} image(s): the clean subset needs at least 1 image and the evaluation at least 1",
                self.clean_size
            )));
        }
        if self.clean_size < n_test {
            return Ok(self.clean_size);
        }
        let half = n_test / 2;
        eprintln!(
            "warning: --clean-size {} does not fit the test split's {n_test} images; lending {half} (half of them) as clean data, the other {} are measured",
            self.clean_size,
            n_test - half
        );
        Ok(half)
    }

    /// The detectors `--verify` runs, or `None` without it (refusing --verify-param alone).
    pub(crate) fn scanner(&self, dirs: &[(PathBuf, &'static str)]) -> Result<Option<super::scan::Scanner>> {
        if !self.verify && self.verify_detectors.is_empty() {
            if !self.verify_params.is_empty() {
                return Err(input_error("--verify-param needs --verify or --verify-detector NAME"));
            }
            return Ok(None);
        }
        super::scan::Scanner::new(
            dirs,
            &self.verify_detectors,
            &self.verify_params,
            super::scan::Offer::verify(),
        )
        .map(Some)
    }
}
