//! Datasets: IDX (MNIST/Fashion-MNIST), NPZ, and a seeded synthetic set.
//!
//! Images are kept as NCHW pixels in 0..255 (`u8`) or 0..1 (`f32`), labels as `i64`, exactly the
//! layout that crosses the plugin ABI, so a dataset is lent to a plugin without copying.

mod idx;
mod npz;
mod synthetic;

use std::path::{Path, PathBuf};

pub use npz::{read_npz, write_npz, NpzArray};
pub use synthetic::synthetic;

/// Where Debian's `dataset-fashion-mnist` puts the files.
pub const FASHION_MNIST_DIR: &str = "/usr/share/datasets/fashion-mnist";

/// A data problem, always naming the file (exit code 2).
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{path}: {reason}")]
    Malformed { path: PathBuf, reason: String },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{0}")]
    Other(String),
}

impl DataError {
    pub(crate) fn malformed(path: &Path, reason: impl Into<String>) -> Self {
        DataError::Malformed {
            path: path.to_path_buf(),
            reason: reason.into(),
        }
    }
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        DataError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Pixel storage.
#[derive(Debug, Clone, PartialEq)]
pub enum Pixels {
    /// 0..255.
    U8(Vec<u8>),
    /// 0..1.
    F32(Vec<f32>),
}

/// A batch of NCHW images.
#[derive(Debug, Clone, PartialEq)]
pub struct Images {
    pub n: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub pixels: Pixels,
}

impl Images {
    /// Elements per image.
    pub fn image_len(&self) -> usize {
        self.c * self.h * self.w
    }

    /// The first `k` images.
    pub fn head(&self, k: usize) -> Images {
        let k = k.min(self.n);
        let m = k * self.image_len();
        let pixels = match &self.pixels {
            Pixels::U8(v) => Pixels::U8(v[..m].to_vec()),
            Pixels::F32(v) => Pixels::F32(v[..m].to_vec()),
        };
        Images { n: k, pixels, ..*self }
    }

    /// Pixels as u8 (f32 is scaled by 255 and rounded).
    pub fn to_u8(&self) -> Vec<u8> {
        match &self.pixels {
            Pixels::U8(v) => v.clone(),
            Pixels::F32(v) => v.iter().map(|&x| (x * 255.0).round().clamp(0.0, 255.0) as u8).collect(),
        }
    }
}

/// Images with labels.
#[derive(Debug, Clone, PartialEq)]
pub struct LabeledSet {
    pub images: Images,
    pub labels: Vec<i64>,
}

impl LabeledSet {
    /// Number of samples.
    pub fn len(&self) -> usize {
        self.labels.len()
    }
    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
    /// The first `k` samples.
    pub fn head(&self, k: usize) -> LabeledSet {
        let k = k.min(self.len());
        LabeledSet {
            images: self.images.head(k),
            labels: self.labels[..k].to_vec(),
        }
    }
}

/// A dataset with a training and a test split.
#[derive(Debug, Clone)]
pub struct Dataset {
    /// What the user asked for (path or built-in name), for messages and reports.
    pub source: String,
    pub train: LabeledSet,
    pub test: LabeledSet,
    pub num_classes: usize,
    /// Indices of poisoned training samples, when the data says (NPZ `poison_idx`).
    pub poison_idx: Option<Vec<i64>>,
}

/// How `--data` is interpreted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DataFormat {
    /// Detect from the path.
    Auto,
    /// IDX files (MNIST, Fashion-MNIST), gzipped or raw.
    Idx,
    /// NPZ with x_train, y_train, x_test, y_test (and optionally poison_idx).
    Npz,
    /// The seeded synthetic set (no files).
    Synthetic,
}

/// Loads `--data`: a folder of IDX files, `fashion-mnist` (Debian's copy), or `synthetic`.
pub fn load(spec: &str, format: DataFormat, seed: u64) -> Result<Dataset, DataError> {
    let format = match format {
        DataFormat::Auto if spec == "synthetic" => DataFormat::Synthetic,
        DataFormat::Auto if spec.ends_with(".npz") => DataFormat::Npz,
        DataFormat::Auto => DataFormat::Idx,
        f => f,
    };
    match format {
        DataFormat::Synthetic => Ok(synthetic(seed, 2000, 500)),
        DataFormat::Npz => {
            let (mut d, poison) = read_npz(Path::new(spec))?;
            d.poison_idx = poison;
            Ok(d)
        }
        DataFormat::Idx | DataFormat::Auto => {
            let dir = if spec == "fashion-mnist" {
                PathBuf::from(FASHION_MNIST_DIR)
            } else {
                PathBuf::from(spec)
            };
            if spec == "fashion-mnist" && !dir.is_dir() {
                return Err(DataError::Other(format!(
                    "Fashion-MNIST is not installed at {FASHION_MNIST_DIR}; run scripts/setup (as root) or use --data synthetic"
                )));
            }
            let mut d = idx::load_dir(&dir)?;
            d.source = spec.to_string();
            Ok(d)
        }
    }
}
