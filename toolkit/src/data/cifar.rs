//! CIFAR-10 and CIFAR-100 in their binary versions.
//!
//! CIFAR-10: `data_batch_1.bin` .. `data_batch_5.bin` and `test_batch.bin`, each a run of 3073-byte
//! records (1 label byte in 0..10, then 3072 pixel bytes: the 32x32 red plane, then green, then
//! blue). CIFAR-100: `train.bin` and `test.bin`, 3074-byte records (coarse label in 0..20, fine
//! label in 0..100, then the same 3072 pixel bytes); the fine label is the one used. The pixel
//! planes are already CHW, so records are copied into NCHW as they are.
//!
//! A folder is accepted as it is or with the archive's own folder (`cifar-10-batches-bin`,
//! `cifar-100-binary`) one level down.

use std::path::{Path, PathBuf};

use super::{DataError, Dataset, Images, LabeledSet, Pixels};

/// Channels, height and width of every CIFAR image.
const C: usize = 3;
const H: usize = 32;
const W: usize = 32;
/// Pixel bytes per record.
const PIXELS: usize = C * H * W;

/// The CIFAR-10 training batches, in order.
const CIFAR10_TRAIN: [&str; 5] = [
    "data_batch_1.bin",
    "data_batch_2.bin",
    "data_batch_3.bin",
    "data_batch_4.bin",
    "data_batch_5.bin",
];
const CIFAR10_TEST: &str = "test_batch.bin";
/// The folder the CIFAR-10 binary archive unpacks to.
const CIFAR10_SUBDIR: &str = "cifar-10-batches-bin";
const CIFAR100_TRAIN: &str = "train.bin";
const CIFAR100_TEST: &str = "test.bin";
/// The folder the CIFAR-100 binary archive unpacks to.
const CIFAR100_SUBDIR: &str = "cifar-100-binary";

const CIFAR10_LAYOUT: &str = "a CIFAR-10 folder holds data_batch_1.bin .. data_batch_5.bin and test_batch.bin";
const CIFAR100_LAYOUT: &str = "a CIFAR-100 folder holds train.bin and test.bin";

/// The two binary variants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Variant {
    Cifar10,
    Cifar100,
}

impl Variant {
    fn name(self) -> &'static str {
        match self {
            Variant::Cifar10 => "CIFAR-10",
            Variant::Cifar100 => "CIFAR-100",
        }
    }
    /// Label bytes before the pixels of each record.
    fn label_bytes(self) -> usize {
        match self {
            Variant::Cifar10 => 1,
            Variant::Cifar100 => 2,
        }
    }
    fn record_len(self) -> usize {
        self.label_bytes() + PIXELS
    }
    fn num_classes(self) -> usize {
        match self {
            Variant::Cifar10 => 10,
            Variant::Cifar100 => 100,
        }
    }
    fn subdir(self) -> &'static str {
        match self {
            Variant::Cifar10 => CIFAR10_SUBDIR,
            Variant::Cifar100 => CIFAR100_SUBDIR,
        }
    }
    fn layout(self) -> &'static str {
        match self {
            Variant::Cifar10 => CIFAR10_LAYOUT,
            Variant::Cifar100 => CIFAR100_LAYOUT,
        }
    }
    /// True when `dir` itself holds this variant's files (the marker file is enough).
    fn holds(self, dir: &Path) -> bool {
        match self {
            Variant::Cifar10 => dir.join(CIFAR10_TRAIN[0]).is_file(),
            Variant::Cifar100 => dir.join(CIFAR100_TRAIN).is_file() && dir.join(CIFAR100_TEST).is_file(),
        }
    }
}

/// Which CIFAR variant the folder `dir` holds, if any (itself or its archive folder one level
/// down): `data_batch_1.bin` means CIFAR-10, `train.bin` with `test.bin` CIFAR-100.
pub(crate) fn detect(dir: &Path) -> Option<Variant> {
    if !dir.is_dir() {
        return None;
    }
    [Variant::Cifar10, Variant::Cifar100]
        .into_iter()
        .find(|&v| v.holds(dir) || dir.join(v.subdir()).is_dir())
}

/// The folder that holds the files: `dir`, or the archive's folder inside it.
fn resolve(dir: &Path, variant: Variant) -> PathBuf {
    let inner = dir.join(variant.subdir());
    if !variant.holds(dir) && inner.is_dir() {
        inner
    } else {
        dir.to_path_buf()
    }
}

/// Parses one batch file's bytes, appending its pixels and labels.
fn parse_batch(
    path: &Path,
    bytes: &[u8],
    variant: Variant,
    pixels: &mut Vec<u8>,
    labels: &mut Vec<i64>,
) -> Result<(), DataError> {
    let rec = variant.record_len();
    if bytes.is_empty() {
        return Err(DataError::malformed(
            path,
            format!("empty file: not a {} binary batch", variant.name()),
        ));
    }
    if !bytes.len().is_multiple_of(rec) {
        return Err(DataError::malformed(
            path,
            format!(
                "size {} bytes is not a multiple of the {rec}-byte {} record ({} label byte(s) + {PIXELS} pixel bytes): \
                 truncated, or not a {} binary batch",
                bytes.len(),
                variant.name(),
                variant.label_bytes(),
                variant.name(),
            ),
        ));
    }
    pixels.reserve(bytes.len() / rec * PIXELS);
    for (i, record) in bytes.chunks_exact(rec).enumerate() {
        let label = match variant {
            Variant::Cifar10 => record[0],
            Variant::Cifar100 => {
                if record[0] >= 20 {
                    return Err(DataError::malformed(
                        path,
                        format!("record {i}: coarse label {} out of range 0..20", record[0]),
                    ));
                }
                record[1]
            }
        };
        if label as usize >= variant.num_classes() {
            let which = if variant == Variant::Cifar100 {
                "fine label"
            } else {
                "label"
            };
            return Err(DataError::malformed(
                path,
                format!("record {i}: {which} {label} out of range 0..{}", variant.num_classes()),
            ));
        }
        labels.push(i64::from(label));
        pixels.extend_from_slice(&record[variant.label_bytes()..]);
    }
    Ok(())
}

/// Reads and concatenates the batch files `names` in `dir`.
fn load_split(dir: &Path, names: &[&str], variant: Variant) -> Result<LabeledSet, DataError> {
    let (mut pixels, mut labels) = (Vec::new(), Vec::new());
    for name in names {
        let path = dir.join(name);
        if !path.is_file() {
            return Err(DataError::malformed(&path, format!("missing ({})", variant.layout())));
        }
        let bytes = super::read_limited(&path)?;
        parse_batch(&path, &bytes, variant, &mut pixels, &mut labels)?;
    }
    Ok(LabeledSet {
        images: Images {
            n: labels.len(),
            c: C,
            h: H,
            w: W,
            pixels: Pixels::U8(pixels),
        },
        labels,
    })
}

/// Loads a CIFAR-10 or CIFAR-100 binary folder (or the folder that holds its archive folder).
pub(crate) fn load_dir(dir: &Path, variant: Variant) -> Result<Dataset, DataError> {
    if !dir.is_dir() {
        return Err(DataError::malformed(
            dir,
            format!("not a folder ({})", variant.layout()),
        ));
    }
    let files = resolve(dir, variant);
    let (train, test) = match variant {
        Variant::Cifar10 => (
            load_split(&files, &CIFAR10_TRAIN, variant)?,
            load_split(&files, &[CIFAR10_TEST], variant)?,
        ),
        Variant::Cifar100 => (
            load_split(&files, &[CIFAR100_TRAIN], variant)?,
            load_split(&files, &[CIFAR100_TEST], variant)?,
        ),
    };
    Ok(Dataset {
        source: dir.display().to_string(),
        train,
        test,
        num_classes: variant.num_classes(),
        poison_idx: None,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A CIFAR-10 record: `label`, then pixel `p` of the record holds `(seed + p) % 251`.
    pub(crate) fn record10(label: u8, seed: usize) -> Vec<u8> {
        let mut r = vec![label];
        r.extend((0..PIXELS).map(|p| ((seed + p) % 251) as u8));
        r
    }

    fn record100(coarse: u8, fine: u8, seed: usize) -> Vec<u8> {
        let mut r = vec![coarse, fine];
        r.extend((0..PIXELS).map(|p| ((seed + p) % 251) as u8));
        r
    }

    /// Writes a CIFAR-10 set into `dir`: two records in every batch, labels 0..12 in order.
    pub(crate) fn write_cifar10(dir: &Path) {
        std::fs::create_dir_all(dir).unwrap();
        for (b, name) in CIFAR10_TRAIN.iter().chain([&CIFAR10_TEST]).enumerate() {
            let bytes = [
                record10(2 * b as u8 % 10, 2 * b),
                record10((2 * b as u8 + 1) % 10, 2 * b + 1),
            ]
            .concat();
            std::fs::write(dir.join(name), bytes).unwrap();
        }
    }

    #[test]
    fn loads_cifar10_batches_in_order_as_nchw() {
        let dir = tempfile::tempdir().unwrap();
        write_cifar10(dir.path());
        assert_eq!(detect(dir.path()), Some(Variant::Cifar10));
        let d = load_dir(dir.path(), Variant::Cifar10).unwrap();
        assert_eq!(d.num_classes, 10);
        assert_eq!((d.train.len(), d.test.len()), (10, 2));
        assert_eq!(d.train.labels, vec![0, 1, 2, 3, 4, 5, 6, 7, 8, 9]);
        assert_eq!(d.test.labels, vec![0, 1]);
        let im = &d.train.images;
        assert_eq!((im.n, im.c, im.h, im.w), (10, 3, 32, 32));
        // Image 3 (second record of data_batch_2) holds (3 + p) % 251 at flat CHW offset p.
        let Pixels::U8(px) = &im.pixels else {
            panic!("u8 pixels")
        };
        let img3 = &px[3 * PIXELS..4 * PIXELS];
        assert_eq!(img3[0], 3);
        assert_eq!(img3[1024], ((3 + 1024) % 251) as u8); // green plane, pixel (0, 0)
        assert_eq!(img3[PIXELS - 1], ((3 + PIXELS - 1) % 251) as u8);
    }

    #[test]
    fn accepts_the_archive_folder_one_level_down() {
        let dir = tempfile::tempdir().unwrap();
        write_cifar10(&dir.path().join(CIFAR10_SUBDIR));
        assert_eq!(detect(dir.path()), Some(Variant::Cifar10));
        let d = load_dir(dir.path(), Variant::Cifar10).unwrap();
        assert_eq!(d.train.len(), 10);
        assert_eq!(d.source, dir.path().display().to_string());
    }

    #[test]
    fn loads_cifar100_with_fine_labels() {
        let dir = tempfile::tempdir().unwrap();
        let w = |name: &str, bytes: Vec<u8>| std::fs::write(dir.path().join(name), bytes).unwrap();
        w("train.bin", [record100(19, 99, 0), record100(0, 42, 1)].concat());
        w("test.bin", record100(3, 7, 2));
        assert_eq!(detect(dir.path()), Some(Variant::Cifar100));
        let d = load_dir(dir.path(), Variant::Cifar100).unwrap();
        assert_eq!(d.num_classes, 100);
        assert_eq!(d.train.labels, vec![99, 42]);
        assert_eq!(d.test.labels, vec![7]);
        assert_eq!(d.train.images.to_u8()[PIXELS], 1);

        // Inside cifar-100-binary/ too.
        let outer = tempfile::tempdir().unwrap();
        let inner = outer.path().join(CIFAR100_SUBDIR);
        std::fs::create_dir(&inner).unwrap();
        for f in ["train.bin", "test.bin"] {
            std::fs::copy(dir.path().join(f), inner.join(f)).unwrap();
        }
        assert_eq!(detect(outer.path()), Some(Variant::Cifar100));
        assert_eq!(
            load_dir(outer.path(), Variant::Cifar100).unwrap().train.labels,
            vec![99, 42]
        );
    }

    #[test]
    fn missing_batches_are_named() {
        let dir = tempfile::tempdir().unwrap();
        write_cifar10(dir.path());
        std::fs::remove_file(dir.path().join("data_batch_4.bin")).unwrap();
        let e = load_dir(dir.path(), Variant::Cifar10).unwrap_err().to_string();
        assert_eq!(
            e,
            format!(
                "{}: missing (a CIFAR-10 folder holds data_batch_1.bin .. data_batch_5.bin and test_batch.bin)",
                dir.path().join("data_batch_4.bin").display()
            )
        );
        write_cifar10(dir.path());
        std::fs::remove_file(dir.path().join("test_batch.bin")).unwrap();
        let e = load_dir(dir.path(), Variant::Cifar10).unwrap_err().to_string();
        assert!(e.contains("test_batch.bin: missing"), "{e}");

        let empty = tempfile::tempdir().unwrap();
        let e = load_dir(empty.path(), Variant::Cifar100).unwrap_err().to_string();
        assert!(
            e.contains("train.bin: missing") && e.contains("CIFAR-100 folder holds train.bin and test.bin"),
            "{e}"
        );
        let e = load_dir(&empty.path().join("nope"), Variant::Cifar10)
            .unwrap_err()
            .to_string();
        assert!(e.contains("nope: not a folder"), "{e}");
    }

    #[test]
    fn bad_record_sizes_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        write_cifar10(dir.path());
        let p = dir.path().join("data_batch_2.bin");
        std::fs::write(&p, [record10(1, 0), vec![7; 100]].concat()).unwrap();
        let e = load_dir(dir.path(), Variant::Cifar10).unwrap_err().to_string();
        assert_eq!(
            e,
            format!(
                "{}: size 3173 bytes is not a multiple of the 3073-byte CIFAR-10 record (1 label byte(s) + 3072 \
                 pixel bytes): truncated, or not a CIFAR-10 binary batch",
                p.display()
            )
        );
        std::fs::write(&p, b"").unwrap();
        let e = load_dir(dir.path(), Variant::Cifar10).unwrap_err().to_string();
        assert!(e.contains("data_batch_2.bin: empty file"), "{e}");
        // A CIFAR-10 batch read as CIFAR-100 fails on the record size too.
        let t = tempfile::tempdir().unwrap();
        std::fs::write(t.path().join("train.bin"), record10(1, 0)).unwrap();
        std::fs::write(t.path().join("test.bin"), record10(1, 0)).unwrap();
        let e = load_dir(t.path(), Variant::Cifar100).unwrap_err().to_string();
        assert!(
            e.contains("train.bin: size 3073 bytes is not a multiple of the 3074-byte"),
            "{e}"
        );
    }

    #[test]
    fn labels_out_of_range_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        write_cifar10(dir.path());
        let p = dir.path().join("test_batch.bin");
        std::fs::write(&p, [record10(0, 0), record10(10, 0)].concat()).unwrap();
        let e = load_dir(dir.path(), Variant::Cifar10).unwrap_err().to_string();
        assert_eq!(e, format!("{}: record 1: label 10 out of range 0..10", p.display()));

        let t = tempfile::tempdir().unwrap();
        let train = t.path().join("train.bin");
        std::fs::write(t.path().join("test.bin"), record100(0, 0, 0)).unwrap();
        std::fs::write(&train, record100(0, 100, 0)).unwrap();
        let e = load_dir(t.path(), Variant::Cifar100).unwrap_err().to_string();
        assert_eq!(
            e,
            format!("{}: record 0: fine label 100 out of range 0..100", train.display())
        );
        std::fs::write(&train, [record100(0, 5, 0), record100(20, 5, 0)].concat()).unwrap();
        let e = load_dir(t.path(), Variant::Cifar100).unwrap_err().to_string();
        assert_eq!(
            e,
            format!("{}: record 1: coarse label 20 out of range 0..20", train.display())
        );
    }

    #[test]
    fn detection_needs_the_marker_files() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(detect(dir.path()), None);
        std::fs::write(dir.path().join("train.bin"), b"").unwrap();
        assert_eq!(detect(dir.path()), None, "train.bin alone is not CIFAR-100");
        std::fs::write(dir.path().join("test.bin"), b"").unwrap();
        assert_eq!(detect(dir.path()), Some(Variant::Cifar100));
        assert_eq!(detect(&dir.path().join("train.bin")), None);
    }
}
