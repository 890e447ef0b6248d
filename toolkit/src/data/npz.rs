//! NPZ output in the layout numpy's `np.load` reads (and the NPZ loader reads back).

use std::path::Path;

use npyz::WriterBuilder;

use super::{DataError, Dataset, Images, LabeledSet, Pixels};

fn io(path: &Path, e: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!("writing {}: {e}", path.display())
}

/// One array to write.
#[derive(Debug, Clone, Copy)]
pub enum NpzArray<'a> {
    /// Images, written NCHW with their own dtype (uint8 or float32).
    Images(&'a Images),
    /// A 1-D int64 array (labels, indices).
    I64(&'a [i64]),
}

/// Writes named arrays to `path` (replacing it), in the layout numpy's `np.load` and
/// [`read_npz`] read: staged and renamed into place like every output ([`crate::output`]).
pub fn write_npz(path: &Path, arrays: &[(&str, NpzArray<'_>)]) -> anyhow::Result<()> {
    let mut out = crate::output::Outputs::new(true, &[]);
    out.plan("npz", path)?;
    out.stage_with(path, |f| write_npz_to(f, path, arrays))?;
    out.commit()
}

/// Writes named arrays as an NPZ archive into `file` (`path` names it in errors).
pub fn write_npz_to(file: &std::fs::File, path: &Path, arrays: &[(&str, NpzArray<'_>)]) -> anyhow::Result<()> {
    let mut npz = npyz::npz::NpzWriter::new(std::io::BufWriter::new(file));
    for (name, array) in arrays {
        match array {
            NpzArray::Images(x) => {
                let shape = [x.n as u64, x.c as u64, x.h as u64, x.w as u64];
                match &x.pixels {
                    Pixels::U8(v) => write_one(&mut npz, path, name, &shape, v)?,
                    Pixels::F32(v) => write_one(&mut npz, path, name, &shape, v)?,
                }
            }
            NpzArray::I64(v) => write_one(&mut npz, path, name, &[v.len() as u64], v)?,
        }
    }
    let mut w = npz.zip_writer().finish().map_err(|e| io(path, e))?;
    std::io::Write::flush(&mut w).map_err(|e| io(path, e))?;
    Ok(())
}

fn write_one<T: npyz::AutoSerialize + Copy, W: std::io::Write + std::io::Seek>(
    npz: &mut npyz::npz::NpzWriter<W>,
    path: &Path,
    name: &str,
    shape: &[u64],
    data: &[T],
) -> anyhow::Result<()> {
    let opts = npyz::zip::write::FileOptions::default();
    let mut w = npz
        .array::<T>(name, opts)
        .map_err(|e| io(path, e))?
        .default_dtype()
        .shape(shape)
        .begin_nd()
        .map_err(|e| io(path, e))?;
    w.extend(data.iter().copied()).map_err(|e| io(path, e))?;
    w.finish().map_err(|e| io(path, e))?;
    Ok(())
}

/// An array read from an NPZ file: shape and elements, converted to the host's types.
enum Array {
    U8(Vec<u8>),
    F32(Vec<f32>),
    I64(Vec<i64>),
}

fn read_array(
    archive: &mut npyz::npz::NpzArchive<std::io::BufReader<std::fs::File>>,
    path: &Path,
    name: &str,
) -> Result<Option<(Vec<usize>, Array)>, DataError> {
    let bad = |reason: String| DataError::malformed(path, format!("array `{name}`: {reason}"));
    let file_name = npyz::npz::file_name_from_array_name(name);
    let stored = match archive.zip_archive().by_name(&file_name) {
        Ok(entry) => entry.size(),
        Err(npyz::zip::result::ZipError::FileNotFound) => return Ok(None),
        Err(e) => return Err(bad(e.to_string())),
    };
    let Some(npy) = archive.by_name(name).map_err(|e| bad(e.to_string()))? else {
        return Ok(None);
    };
    let shape: Vec<usize> = npy.shape().iter().map(|&d| d as usize).collect();
    let npyz::DType::Plain(ts) = npy.dtype() else {
        return Err(bad("structured arrays are not supported".into()));
    };
    let ts = ts.to_string();
    let elems = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| bad("absurd shape".into()))?;
    let esize: usize = ts[2..].parse().unwrap_or(0);
    if elems.checked_mul(esize).is_none_or(|b| b as u64 > stored) {
        return Err(bad(format!(
            "shape {shape:?} of {ts} needs more data than the file holds (truncated?)"
        )));
    }
    let io = |e: std::io::Error| bad(format!("unreadable data: {e}"));
    let arr = match &ts[1..] {
        "u1" => Array::U8(npy.into_vec::<u8>().map_err(io)?),
        "f4" => Array::F32(npy.into_vec::<f32>().map_err(io)?),
        "f8" => Array::F32(
            npy.into_vec::<f64>()
                .map_err(io)?
                .into_iter()
                .map(|x| x as f32)
                .collect(),
        ),
        "i8" => Array::I64(npy.into_vec::<i64>().map_err(io)?),
        "i4" => Array::I64(npy.into_vec::<i32>().map_err(io)?.into_iter().map(i64::from).collect()),
        "i2" => Array::I64(npy.into_vec::<i16>().map_err(io)?.into_iter().map(i64::from).collect()),
        "i1" => Array::I64(npy.into_vec::<i8>().map_err(io)?.into_iter().map(i64::from).collect()),
        "u2" => Array::I64(npy.into_vec::<u16>().map_err(io)?.into_iter().map(i64::from).collect()),
        "u4" => Array::I64(npy.into_vec::<u32>().map_err(io)?.into_iter().map(i64::from).collect()),
        "u8" => Array::I64(
            npy.into_vec::<u64>()
                .map_err(io)?
                .into_iter()
                .map(|x| x as i64)
                .collect(),
        ),
        other => return Err(bad(format!("unsupported dtype {other}"))),
    };
    let got = match &arr {
        Array::U8(v) => v.len(),
        Array::F32(v) => v.len(),
        Array::I64(v) => v.len(),
    };
    if elems != got {
        return Err(bad("element count does not match the shape".into()));
    }
    Ok(Some((shape, arr)))
}

fn images_from(path: &Path, name: &str, shape: Vec<usize>, arr: Array) -> Result<Images, DataError> {
    let bad = |reason: String| DataError::malformed(path, format!("array `{name}`: {reason}"));
    let (n, c, h, w, nhwc) = match shape[..] {
        [n, h, w] => (n, 1, h, w, false),
        [n, a, b, d] if (a == 1 || a == 3) && !(d == 1 || d == 3) => (n, a, b, d, false),
        [n, a, b, d] if d == 1 || d == 3 => (n, d, a, b, true),
        [n, a, b, d] => (n, a, b, d, false),
        _ => {
            return Err(bad(format!(
                "expected images N x C x H x W (or N x H x W x C), got shape {shape:?}"
            )))
        }
    };
    let pixels = match arr {
        Array::U8(v) => Pixels::U8(if nhwc { nhwc_to_nchw(&v, n, h, w, c) } else { v }),
        Array::F32(v) => {
            if let Some(bad_px) = v.iter().find(|x| !(0.0..=1.0).contains(*x)) {
                return Err(bad(format!("float pixel {bad_px} outside 0..1")));
            }
            Pixels::F32(if nhwc { nhwc_to_nchw(&v, n, h, w, c) } else { v })
        }
        Array::I64(_) => return Err(bad("images must be uint8 (0..255) or float (0..1)".into())),
    };
    Ok(Images { n, c, h, w, pixels })
}

fn nhwc_to_nchw<T: Copy + Default>(v: &[T], n: usize, h: usize, w: usize, c: usize) -> Vec<T> {
    let mut out = vec![T::default(); v.len()];
    for i in 0..n {
        for y in 0..h {
            for x in 0..w {
                for ch in 0..c {
                    out[((i * c + ch) * h + y) * w + x] = v[((i * h + y) * w + x) * c + ch];
                }
            }
        }
    }
    out
}

fn labels_from(path: &Path, name: &str, shape: &[usize], arr: Array) -> Result<Vec<i64>, DataError> {
    match (shape.len(), arr) {
        (1, Array::I64(v)) => Ok(v),
        (1, Array::U8(v)) => Ok(v.into_iter().map(i64::from).collect()),
        _ => Err(DataError::malformed(
            path,
            format!("array `{name}`: labels must be a 1-D integer array, got shape {shape:?}"),
        )),
    }
}

/// Deflate cannot expand data more than about 1032 times (1100 leaves a margin); an entry that claims more is corrupt
/// or a zip bomb.
const MAX_INFLATE_RATIO: u64 = 1100;

/// Checks the archive's entries before any is read: no two with one name (numpy would read the
/// last, a reviewer the first), each within the size limit once inflated, none claiming more
/// than deflate can produce, and all together within the limit.
fn check_entries<R: std::io::Read + std::io::Seek>(
    zip: &mut npyz::zip::ZipArchive<R>,
    path: &Path,
    limit: u64,
) -> Result<(), DataError> {
    let mut names = std::collections::HashSet::new();
    let mut total: u64 = 0;
    for i in 0..zip.len() {
        let entry = zip
            .by_index_raw(i)
            .map_err(|e| DataError::malformed(path, format!("zip entry {i}: {e}")))?;
        let name = entry.name().to_string();
        if !names.insert(name.clone()) {
            return Err(DataError::malformed(
                path,
                format!("the archive holds two entries named `{name}`: refused (which one counts would be ambiguous)"),
            ));
        }
        let (size, packed) = (entry.size(), entry.compressed_size());
        total = total.saturating_add(size);
        if size > limit || total > limit {
            return Err(DataError::malformed(
                path,
                format!(
                    "entry `{name}` inflates to {size} bytes ({total} so far), more than the {limit}-byte input limit ({} raises it)",
                    audit_nn::limits::MAX_INPUT_BYTES_ENV
                ),
            ));
        }
        if size > packed.saturating_mul(MAX_INFLATE_RATIO).max(1 << 16) {
            return Err(DataError::malformed(
                path,
                format!("entry `{name}` claims {size} bytes from {packed} compressed: corrupt, or a zip bomb"),
            ));
        }
    }
    Ok(())
}

/// Reads an NPZ dataset: `x_train, y_train, x_test, y_test` (NCHW or NHWC, uint8 or float in 0..1)
/// and optionally `poison_idx`. Returns the dataset and the poisoned indices when present.
pub fn read_npz(path: &Path) -> Result<(Dataset, Option<Vec<i64>>), DataError> {
    let file = std::fs::File::open(path).map_err(|e| DataError::io(path, e))?;
    let limit = audit_nn::limits::max_input_bytes();
    let size = file.metadata().map_err(|e| DataError::io(path, e))?.len();
    if size > limit {
        return Err(DataError::malformed(
            path,
            audit_nn::limits::ReadError::TooLarge {
                size: Some(size),
                limit,
            }
            .to_string(),
        ));
    }
    let mut archive = npyz::npz::NpzArchive::new(std::io::BufReader::new(file))
        .map_err(|e| DataError::malformed(path, format!("not an NPZ (zip) file: {e}")))?;
    check_entries(archive.zip_archive(), path, limit)?;
    let mut need = |name: &str| -> Result<(Vec<usize>, Array), DataError> {
        read_array(&mut archive, path, name)?.ok_or_else(|| {
            DataError::malformed(
                path,
                format!("missing array `{name}` (need x_train, y_train, x_test, y_test)"),
            )
        })
    };
    let (xs, xa) = need("x_train")?;
    let (ys, ya) = need("y_train")?;
    let (ts, ta) = need("x_test")?;
    let (us, ua) = need("y_test")?;
    let train = LabeledSet {
        images: images_from(path, "x_train", xs, xa)?,
        labels: labels_from(path, "y_train", &ys, ya)?,
    };
    let test = LabeledSet {
        images: images_from(path, "x_test", ts, ta)?,
        labels: labels_from(path, "y_test", &us, ua)?,
    };
    for (name, set) in [("train", &train), ("test", &test)] {
        if set.images.n != set.labels.len() {
            return Err(DataError::malformed(
                path,
                format!(
                    "{} labels for {} images in the {name} split",
                    set.labels.len(),
                    set.images.n
                ),
            ));
        }
    }
    if (train.images.c, train.images.h, train.images.w) != (test.images.c, test.images.h, test.images.w) {
        return Err(DataError::malformed(
            path,
            "x_train and x_test have different image sizes",
        ));
    }
    let all = train.labels.iter().chain(&test.labels);
    if let Some(bad) = all.clone().find(|&&l| l < 0) {
        return Err(DataError::malformed(path, format!("negative label {bad}")));
    }
    let num_classes = all.max().map_or(0, |&m| m as usize + 1).max(2);
    if num_classes > 100_000 {
        return Err(DataError::malformed(
            path,
            format!("label {} is absurd", num_classes - 1),
        ));
    }
    let poison = match read_array(&mut archive, path, "poison_idx")? {
        None => None,
        Some((shape, arr)) => {
            let idx = labels_from(path, "poison_idx", &shape, arr)?;
            if let Some(bad) = idx.iter().find(|&&i| i < 0 || i as usize >= train.len()) {
                return Err(DataError::malformed(
                    path,
                    format!("poison_idx {bad} outside 0..{}", train.len()),
                ));
            }
            Some(idx)
        }
    };
    Ok((
        Dataset {
            source: path.display().to_string(),
            train,
            test,
            num_classes,
            poison_idx: None,
        },
        poison,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid(dir: &Path) -> std::path::PathBuf {
        let images = Images {
            n: 3,
            c: 1,
            h: 2,
            w: 2,
            pixels: Pixels::U8(vec![7; 12]),
        };
        let p = dir.join("d.npz");
        write_npz(
            &p,
            &[
                ("x_train", NpzArray::Images(&images)),
                ("y_train", NpzArray::I64(&[0, 1, 2])),
                ("x_test", NpzArray::Images(&images)),
                ("y_test", NpzArray::I64(&[0, 1, 2])),
            ],
        )
        .unwrap();
        p
    }

    #[test]
    fn finding_low_duplicate_npz_entries_are_refused_naming_the_entry() {
        let dir = tempfile::tempdir().unwrap();
        let p = valid(dir.path());
        assert_eq!(read_npz(&p).unwrap().0.test.len(), 3);
        let mut src = npyz::zip::ZipArchive::new(std::fs::File::open(&p).unwrap()).unwrap();
        let dup = dir.path().join("dup.npz");
        let mut w = npyz::zip::ZipWriter::new(std::fs::File::create(&dup).unwrap());
        for i in 0..src.len() {
            w.raw_copy_file(src.by_index_raw(i).unwrap()).unwrap();
        }
        w.raw_copy_file(src.by_name("y_test.npy").unwrap()).unwrap();
        w.finish().unwrap();
        let e = read_npz(&dup).unwrap_err().to_string();
        assert!(
            e.contains("dup.npz") && e.contains("two entries named `y_test.npy`"),
            "{e}"
        );
    }

    #[test]
    fn finding_16_npz_inflated_sizes_are_capped() {
        let dir = tempfile::tempdir().unwrap();
        let p = valid(dir.path());
        let mut zip = npyz::zip::ZipArchive::new(std::fs::File::open(&p).unwrap()).unwrap();
        assert!(check_entries(&mut zip, &p, 1 << 20).is_ok());
        let e = check_entries(&mut zip, &p, 100).unwrap_err().to_string();
        assert!(
            e.contains("100-byte input limit") && e.contains("AUDIT_MAX_INPUT_BYTES"),
            "{e}"
        );
        // An entry whose central directory claims 4 GB from a few bytes: a zip bomb (or a lie).
        let mut bytes = std::fs::read(&p).unwrap();
        let cd = bytes.windows(4).position(|w| w == [0x50, 0x4b, 0x01, 0x02]).unwrap();
        bytes[cd + 24..cd + 28].copy_from_slice(&0xffff_fff0u32.to_le_bytes());
        let bomb = dir.path().join("bomb.npz");
        std::fs::write(&bomb, &bytes).unwrap();
        let mut zip = npyz::zip::ZipArchive::new(std::fs::File::open(&bomb).unwrap()).unwrap();
        let e = check_entries(&mut zip, &bomb, u64::MAX).unwrap_err().to_string();
        assert!(e.contains("zip bomb"), "{e}");
        let e = read_npz(&bomb).unwrap_err().to_string();
        assert!(e.contains("bomb.npz") && e.contains("input limit"), "{e}");
    }
}
