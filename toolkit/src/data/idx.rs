//! IDX files (the MNIST format): `train-images-idx3-ubyte[.gz]` and friends in one folder.

use std::path::{Path, PathBuf};

use super::{DataError, Dataset, Images, LabeledSet, Pixels};

/// Largest image count we accept (guards against absurd headers).
const MAX_ITEMS: usize = 50_000_000;

fn find(dir: &Path, stem: &str) -> Result<PathBuf, DataError> {
    for name in [format!("{stem}.gz"), stem.to_string()] {
        let p = dir.join(&name);
        if p.is_file() {
            return Ok(p);
        }
    }
    Err(DataError::malformed(
        dir,
        format!("no {stem} or {stem}.gz in this folder (expected IDX files)"),
    ))
}

/// Reads a file (gunzipped when it is gzip), at most `AUDIT_MAX_INPUT_BYTES` on disk and once
/// inflated.
fn read_all(path: &Path) -> Result<Vec<u8>, DataError> {
    let raw = super::read_limited(path)?;
    if raw.starts_with(&[0x1f, 0x8b]) {
        let limit = audit_nn::limits::max_input_bytes();
        audit_nn::limits::read_to_limit(flate2::read::GzDecoder::new(&raw[..]), limit).map_err(|e| match e {
            audit_nn::limits::ReadError::Io(e) => DataError::malformed(path, format!("corrupt gzip: {e}")),
            too_large => DataError::malformed(path, format!("inflates to {too_large}")),
        })
    } else {
        Ok(raw)
    }
}

/// Parses an IDX byte buffer: returns (dims, data) for unsigned-byte IDX files.
pub(crate) fn parse(path: &Path, bytes: &[u8]) -> Result<(Vec<usize>, Vec<u8>), DataError> {
    if bytes.len() < 4 || bytes[0] != 0 || bytes[1] != 0 {
        return Err(DataError::malformed(path, "wrong magic number: not an IDX file"));
    }
    if bytes[2] != 0x08 {
        return Err(DataError::malformed(
            path,
            format!("unsupported IDX element type 0x{:02x} (only unsigned byte)", bytes[2]),
        ));
    }
    let ndim = bytes[3] as usize;
    if ndim == 0 || ndim > 4 {
        return Err(DataError::malformed(path, format!("unsupported IDX rank {ndim}")));
    }
    let header = 4 + 4 * ndim;
    if bytes.len() < header {
        return Err(DataError::malformed(path, "truncated header"));
    }
    let dims: Vec<usize> = (0..ndim)
        .map(|i| u32::from_be_bytes(bytes[4 + 4 * i..8 + 4 * i].try_into().unwrap()) as usize)
        .collect();
    let total = dims
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .filter(|&t| t / dims[0].max(1) <= 1 << 24);
    let Some(total) = total.filter(|_| dims[0] <= MAX_ITEMS) else {
        return Err(DataError::malformed(path, format!("absurd dimensions {dims:?}")));
    };
    let body = &bytes[header..];
    if body.len() < total {
        return Err(DataError::malformed(
            path,
            format!("truncated: header says {total} bytes of data, file has {}", body.len()),
        ));
    }
    Ok((dims, body[..total].to_vec()))
}

fn load_split(dir: &Path, prefix: &str) -> Result<LabeledSet, DataError> {
    let ip = find(dir, &format!("{prefix}-images-idx3-ubyte"))?;
    let lp = find(dir, &format!("{prefix}-labels-idx1-ubyte"))?;
    let (idims, pixels) = parse(&ip, &read_all(&ip)?)?;
    let (ldims, labels) = parse(&lp, &read_all(&lp)?)?;
    if idims.len() != 3 {
        return Err(DataError::malformed(
            &ip,
            format!("expected N x H x W images, got dims {idims:?}"),
        ));
    }
    if ldims.len() != 1 {
        return Err(DataError::malformed(
            &lp,
            format!("expected a 1-D label file, got dims {ldims:?}"),
        ));
    }
    if idims[0] != ldims[0] {
        return Err(DataError::malformed(
            &lp,
            format!("{} labels for {} images in {}", ldims[0], idims[0], ip.display()),
        ));
    }
    Ok(LabeledSet {
        images: Images {
            n: idims[0],
            c: 1,
            h: idims[1],
            w: idims[2],
            pixels: Pixels::U8(pixels),
        },
        labels: labels.into_iter().map(i64::from).collect(),
    })
}

/// Loads `train-*` and `t10k-*` IDX files from `dir`. Labels must lie in 0..10.
pub fn load_dir(dir: &Path) -> Result<Dataset, DataError> {
    if !dir.is_dir() {
        return Err(DataError::malformed(
            dir,
            "not a folder (expected a folder of IDX files, or `synthetic`)",
        ));
    }
    let train = load_split(dir, "train")?;
    let test = load_split(dir, "t10k")?;
    let num_classes = 10;
    for (split, set) in [("train", &train), ("t10k", &test)] {
        if let Some(bad) = set.labels.iter().find(|&&l| l as usize >= num_classes) {
            return Err(DataError::malformed(
                &dir.join(format!("{split}-labels-idx1-ubyte")),
                format!("label {bad} out of range 0..{num_classes}"),
            ));
        }
    }
    Ok(Dataset {
        source: dir.display().to_string(),
        train,
        test,
        num_classes,
        poison_idx: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn idx(dims: &[u32], body: &[u8]) -> Vec<u8> {
        let mut v = vec![0, 0, 8, dims.len() as u8];
        for d in dims {
            v.extend_from_slice(&d.to_be_bytes());
        }
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn parses_a_small_file() {
        let (dims, data) = parse(Path::new("x"), &idx(&[2, 2, 2], &[1, 2, 3, 4, 5, 6, 7, 8])).unwrap();
        assert_eq!(dims, vec![2, 2, 2]);
        assert_eq!(data, vec![1, 2, 3, 4, 5, 6, 7, 8]);
    }

    #[test]
    fn rejects_bad_input_naming_the_file() {
        let p = Path::new("/data/train-images-idx3-ubyte");
        let e = parse(p, b"\x12\x34\x08\x03").unwrap_err().to_string();
        assert!(
            e.contains("/data/train-images-idx3-ubyte") && e.contains("magic"),
            "{e}"
        );
        let e = parse(p, &idx(&[3, 2, 2], &[0; 5])).unwrap_err().to_string();
        assert!(e.contains("truncated"), "{e}");
        let e = parse(p, &idx(&[u32::MAX, u32::MAX, u32::MAX], &[]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("absurd"), "{e}");
        assert!(parse(p, &[0, 0, 8]).is_err());
        assert!(parse(p, &[0, 0, 8, 2, 0, 0])
            .unwrap_err()
            .to_string()
            .contains("truncated header"));
    }

    #[test]
    fn never_panics_on_random_bytes() {
        // A small deterministic fuzz: random headers and bodies must give Ok or a clean error.
        let mut state = 0x9e3779b97f4a7c15u64;
        for _ in 0..20_000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let len = (state % 40) as usize;
            let mut bytes: Vec<u8> = (0..len).map(|i| (state >> (i % 8 * 8)) as u8).collect();
            if len > 3 {
                bytes[0] = 0;
                bytes[1] = 0;
                bytes[2] = 8;
                bytes[3] %= 5;
            }
            let _ = parse(Path::new("fuzz"), &bytes);
        }
    }

    #[test]
    fn mismatched_counts_and_labels_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let w = |name: &str, bytes: Vec<u8>| std::fs::write(dir.path().join(name), bytes).unwrap();
        w("train-images-idx3-ubyte", idx(&[2, 1, 1], &[0, 1]));
        w("train-labels-idx1-ubyte", idx(&[3], &[0, 1, 2]));
        w("t10k-images-idx3-ubyte", idx(&[1, 1, 1], &[0]));
        w("t10k-labels-idx1-ubyte", idx(&[1], &[0]));
        let e = load_dir(dir.path()).unwrap_err().to_string();
        assert!(
            e.contains("train-labels-idx1-ubyte") && e.contains("3 labels for 2 images"),
            "{e}"
        );
        w("train-labels-idx1-ubyte", idx(&[2], &[0, 11]));
        let e = load_dir(dir.path()).unwrap_err().to_string();
        assert!(e.contains("label 11 out of range"), "{e}");
    }
}
