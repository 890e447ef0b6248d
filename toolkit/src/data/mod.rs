//! Datasets: IDX (MNIST/Fashion-MNIST), NPZ, CIFAR-10/100 binary batches, image folders
//! (`train/<class>/*.png`), and a seeded synthetic set.
//!
//! Images are kept as NCHW pixels in 0..255 (`u8`) or 0..1 (`f32`), labels as `i64`, exactly the
//! layout that crosses the plugin ABI, so a dataset is lent to a plugin without copying.

mod cifar;
mod idx;
mod imagefolder;
mod npz;
mod synthetic;

use std::path::{Path, PathBuf};

pub use npz::{read_npz, write_npz, write_npz_to, NpzArray};
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

/// Reads a data file with the input size limit (`AUDIT_MAX_INPUT_BYTES`), never past it.
pub(crate) fn read_limited(path: &Path) -> Result<Vec<u8>, DataError> {
    audit_nn::limits::read_file(path).map_err(|e| match e {
        audit_nn::limits::ReadError::Io(e) => DataError::io(path, e),
        too_large => DataError::malformed(path, too_large.to_string()),
    })
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
        self.range(0, k)
    }

    /// Up to `k` images from `start` (none when `start` is past the end).
    pub fn range(&self, start: usize, k: usize) -> Images {
        let start = start.min(self.n);
        let k = k.min(self.n - start);
        let (a, b) = (start * self.image_len(), (start + k) * self.image_len());
        let pixels = match &self.pixels {
            Pixels::U8(v) => Pixels::U8(v[a..b].to_vec()),
            Pixels::F32(v) => Pixels::F32(v[a..b].to_vec()),
        };
        Images { n: k, pixels, ..*self }
    }

    /// `self` then `other` (same image shape; u8 pixels stay u8 when both are, else both become
    /// f32 in 0..1). None when the shapes differ.
    pub fn concat(&self, other: &Images) -> Option<Images> {
        if (self.c, self.h, self.w) != (other.c, other.h, other.w) {
            return None;
        }
        let f32s = |p: &Pixels| match p {
            Pixels::U8(v) => v.iter().map(|&x| f32::from(x) / 255.0).collect::<Vec<f32>>(),
            Pixels::F32(v) => v.clone(),
        };
        let pixels = match (&self.pixels, &other.pixels) {
            (Pixels::U8(a), Pixels::U8(b)) => Pixels::U8([a.as_slice(), b.as_slice()].concat()),
            (a, b) => Pixels::F32([f32s(a), f32s(b)].concat()),
        };
        Some(Images {
            n: self.n + other.n,
            pixels,
            ..*self
        })
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
        self.range(0, k)
    }

    /// The samples at `idx` (in that order; every index must be in range).
    pub fn select(&self, idx: &[usize]) -> LabeledSet {
        let len = self.images.image_len();
        let pick = |i: usize| i * len..(i + 1) * len;
        let pixels = match &self.images.pixels {
            Pixels::U8(v) => Pixels::U8(idx.iter().flat_map(|&i| v[pick(i)].iter().copied()).collect()),
            Pixels::F32(v) => Pixels::F32(idx.iter().flat_map(|&i| v[pick(i)].iter().copied()).collect()),
        };
        LabeledSet {
            images: Images {
                n: idx.len(),
                pixels,
                ..self.images
            },
            labels: idx.iter().map(|&i| self.labels[i]).collect(),
        }
    }

    /// Up to `k` samples from `start`.
    pub fn range(&self, start: usize, k: usize) -> LabeledSet {
        let images = self.images.range(start, k);
        let start = start.min(self.len());
        LabeledSet {
            labels: self.labels[start..start + images.n].to_vec(),
            images,
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
    /// CIFAR-10 binary batches: data_batch_1.bin .. data_batch_5.bin and test_batch.bin (or their
    /// cifar-10-batches-bin folder one level down).
    Cifar10,
    /// CIFAR-100 binary: train.bin and test.bin (or their cifar-100-binary folder one level down);
    /// the fine labels (100 classes).
    Cifar100,
    /// train/<class>/*.png|jpg|jpeg and test/<class>/*; classes sorted by folder name.
    ImageFolder,
}

/// Loads `--data`: a folder of IDX files, CIFAR-10/100 binary batches or class folders, an NPZ
/// file, `fashion-mnist` (Debian's copy), or `synthetic`.
///
/// `Auto` picks, in order: `synthetic`; `*.npz`; a folder with `train/` and `test/` subfolders (an
/// image folder); a folder with `data_batch_1.bin` or `cifar-10-batches-bin/` (CIFAR-10); one with
/// `train.bin` and `test.bin` or `cifar-100-binary/` (CIFAR-100); anything else, `fashion-mnist`
/// included, as IDX.
pub fn load(spec: &str, format: DataFormat, seed: u64) -> Result<Dataset, DataError> {
    let format = match format {
        DataFormat::Auto => detect(spec),
        f => f,
    };
    let mut d = match format {
        DataFormat::Synthetic => return Ok(synthetic(seed, 2000, 500)),
        DataFormat::Npz => {
            let (mut d, poison) = read_npz(Path::new(spec))?;
            d.poison_idx = poison;
            return Ok(d);
        }
        DataFormat::Cifar10 => cifar::load_dir(Path::new(spec), cifar::Variant::Cifar10)?,
        DataFormat::Cifar100 => cifar::load_dir(Path::new(spec), cifar::Variant::Cifar100)?,
        DataFormat::ImageFolder => imagefolder::load_dir(Path::new(spec))?,
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
            idx::load_dir(&dir)?
        }
    };
    d.source = spec.to_string();
    Ok(d)
}

/// The format `--data-format auto` picks for `spec` (see [`load`]).
pub fn detect(spec: &str) -> DataFormat {
    let path = Path::new(spec);
    if spec == "synthetic" {
        DataFormat::Synthetic
    } else if spec.ends_with(".npz") {
        DataFormat::Npz
    } else if spec == "fashion-mnist" || !path.is_dir() {
        DataFormat::Idx
    } else if imagefolder::detect(path) {
        DataFormat::ImageFolder
    } else {
        match cifar::detect(path) {
            Some(cifar::Variant::Cifar10) => DataFormat::Cifar10,
            Some(cifar::Variant::Cifar100) => DataFormat::Cifar100,
            None => DataFormat::Idx,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_and_concatenation_keep_images_whole() {
        let im = |n: usize, p: Pixels| Images {
            n,
            c: 1,
            h: 1,
            w: 2,
            pixels: p,
        };
        let set = LabeledSet {
            images: im(3, Pixels::U8(vec![0, 1, 2, 3, 4, 5])),
            labels: vec![7, 8, 9],
        };
        let mid = set.range(1, 5);
        assert_eq!(
            (mid.images.pixels.clone(), mid.labels.clone()),
            (Pixels::U8(vec![2, 3, 4, 5]), vec![8, 9])
        );
        assert!(set.range(9, 2).is_empty());
        let both = mid.images.concat(&set.images.head(1)).unwrap();
        assert_eq!((both.n, both.pixels), (3, Pixels::U8(vec![2, 3, 4, 5, 0, 1])));
        let mixed = im(1, Pixels::U8(vec![255, 0]))
            .concat(&im(1, Pixels::F32(vec![0.5, 1.0])))
            .unwrap();
        assert_eq!(mixed.pixels, Pixels::F32(vec![1.0, 0.0, 0.5, 1.0]));
        let other = Images {
            c: 2,
            ..im(1, Pixels::U8(vec![0, 0, 0, 0]))
        };
        assert!(mixed.concat(&other).is_none());
        let picked = set.select(&[2, 0]);
        assert_eq!(
            (picked.images.pixels, picked.labels),
            (Pixels::U8(vec![4, 5, 0, 1]), vec![9, 7])
        );
    }

    #[test]
    fn auto_detects_every_format() {
        assert_eq!(detect("synthetic"), DataFormat::Synthetic);
        assert_eq!(detect("x/poisoned.npz"), DataFormat::Npz);
        assert_eq!(detect("fashion-mnist"), DataFormat::Idx);
        assert_eq!(detect("/no/such/folder"), DataFormat::Idx);

        let idx = tempfile::tempdir().unwrap();
        assert_eq!(detect(idx.path().to_str().unwrap()), DataFormat::Idx);

        let c10 = tempfile::tempdir().unwrap();
        cifar::tests::write_cifar10(c10.path());
        let spec = c10.path().to_str().unwrap();
        assert_eq!(detect(spec), DataFormat::Cifar10);
        let d = load(spec, DataFormat::Auto, 0).unwrap();
        assert_eq!((d.num_classes, d.train.len(), d.source.as_str()), (10, 10, spec));

        let nested = tempfile::tempdir().unwrap();
        cifar::tests::write_cifar10(&nested.path().join("cifar-10-batches-bin"));
        assert_eq!(detect(nested.path().to_str().unwrap()), DataFormat::Cifar10);

        let c100 = tempfile::tempdir().unwrap();
        std::fs::write(c100.path().join("train.bin"), b"").unwrap();
        std::fs::write(c100.path().join("test.bin"), b"").unwrap();
        assert_eq!(detect(c100.path().to_str().unwrap()), DataFormat::Cifar100);

        let folder = tempfile::tempdir().unwrap();
        for split in ["train", "test"] {
            let class = folder.path().join(split).join("only");
            std::fs::create_dir_all(&class).unwrap();
            imagefolder::tests::rgb(3, 3, 1).save(class.join("a.png")).unwrap();
        }
        let spec = folder.path().to_str().unwrap();
        assert_eq!(detect(spec), DataFormat::ImageFolder);
        let d = load(spec, DataFormat::Auto, 0).unwrap();
        assert_eq!((d.num_classes, d.train.len(), d.test.len()), (1, 1, 1));
    }

    #[test]
    fn an_explicit_format_overrides_detection() {
        let c10 = tempfile::tempdir().unwrap();
        cifar::tests::write_cifar10(c10.path());
        let spec = c10.path().to_str().unwrap();
        let e = load(spec, DataFormat::ImageFolder, 0).unwrap_err().to_string();
        assert!(e.contains("train: missing (an image folder holds"), "{e}");
        let e = load(spec, DataFormat::Cifar100, 0).unwrap_err().to_string();
        assert!(e.contains("train.bin: missing"), "{e}");
        let e = load(spec, DataFormat::Idx, 0).unwrap_err().to_string();
        assert!(e.contains("expected IDX files"), "{e}");
        assert_eq!(load(spec, DataFormat::Cifar10, 0).unwrap().test.len(), 2);
    }

    #[test]
    fn format_names_on_the_command_line() {
        use clap::ValueEnum;
        let names: Vec<String> = DataFormat::value_variants()
            .iter()
            .map(|v| v.to_possible_value().unwrap().get_name().to_string())
            .collect();
        assert_eq!(
            names,
            ["auto", "idx", "npz", "synthetic", "cifar10", "cifar100", "image-folder"]
        );
    }
}

/// sha256 (hex) over the shapes, pixels and labels of `sets`, in order: the same data loaded twice
/// gives the same fingerprint, a changed pixel or label a different one. Reports carry it so a
/// reviewer can tell which data a number was measured on.
pub fn fingerprint(sets: &[&LabeledSet]) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for s in sets {
        let i = &s.images;
        for d in [i.n, i.c, i.h, i.w] {
            h.update((d as u64).to_le_bytes());
        }
        match &i.pixels {
            Pixels::U8(v) => {
                h.update(b"u8");
                h.update(v);
            }
            Pixels::F32(v) => {
                h.update(b"f32");
                for x in v {
                    h.update(x.to_le_bytes());
                }
            }
        }
        for y in &s.labels {
            h.update(y.to_le_bytes());
        }
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod fingerprint_tests {
    use super::*;

    #[test]
    fn fingerprint_changes_with_any_pixel_or_label() {
        let d = synthetic(1, 50, 20);
        let a = fingerprint(&[&d.train, &d.test]);
        assert_eq!(a, fingerprint(&[&synthetic(1, 50, 20).train, &d.test]));
        assert_eq!(a.len(), 64);
        let mut t = d.train.clone();
        t.labels[3] = (t.labels[3] + 1) % 10;
        assert_ne!(a, fingerprint(&[&t, &d.test]));
        let mut t = d.train.clone();
        if let Pixels::U8(v) = &mut t.images.pixels {
            v[7] ^= 1;
        } else if let Pixels::F32(v) = &mut t.images.pixels {
            v[7] += 0.5;
        }
        assert_ne!(a, fingerprint(&[&t, &d.test]));
        assert_ne!(a, fingerprint(&[&d.test, &d.train]), "order matters");
    }
}
