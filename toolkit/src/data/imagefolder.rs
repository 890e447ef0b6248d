//! Image folders in the torchvision `ImageFolder` layout: `DIR/train/<class>/*.png|jpg|jpeg` and
//! `DIR/test/<class>/*`.
//!
//! Classes are the class folders sorted by name (label = position in that list), and both splits
//! must have the same ones. Images are read in sorted file-name order within each class, classes
//! in label order. Files with other extensions and hidden entries (names starting with `.`) are
//! skipped; a file with an image extension that does not decode is an error. Every image must have
//! the size and channel count of the first: grayscale images give 1 channel, colour images 3
//! (alpha is dropped), 16-bit images are scaled to 8 bits.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use super::{DataError, Dataset, Images, LabeledSet, Pixels};

/// Extensions read as images (compared case-insensitively).
const EXTENSIONS: [&str; 3] = ["png", "jpg", "jpeg"];
const LAYOUT: &str = "an image folder holds train/<class>/*.png|jpg|jpeg and test/<class>/*.png|jpg|jpeg";

/// True when `dir` has `train/` and `test/` subfolders.
pub(crate) fn detect(dir: &Path) -> bool {
    dir.join("train").is_dir() && dir.join("test").is_dir()
}

/// Entries of `dir` sorted by name, hidden ones left out.
fn sorted_entries(dir: &Path) -> Result<Vec<(OsString, PathBuf)>, DataError> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| DataError::io(dir, e))? {
        let entry = entry.map_err(|e| DataError::io(dir, e))?;
        let name = entry.file_name();
        if !name.to_string_lossy().starts_with('.') {
            out.push((name, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// The class folders of a split, sorted by name.
fn classes(split: &Path) -> Result<Vec<(OsString, PathBuf)>, DataError> {
    let mut found = sorted_entries(split)?;
    found.retain(|(_, p)| p.is_dir());
    if found.is_empty() {
        return Err(DataError::malformed(split, format!("no class folders ({LAYOUT})")));
    }
    Ok(found)
}

fn is_image(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| EXTENSIONS.iter().any(|x| x.eq_ignore_ascii_case(e)))
}

/// Channels, height and width of one image, and the file it came from (for messages).
struct Shape {
    c: usize,
    h: usize,
    w: usize,
    file: PathBuf,
}

impl std::fmt::Display for Shape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = if self.c == 1 { "grayscale" } else { "RGB" };
        write!(f, "{}x{} {kind}", self.w, self.h)
    }
}

/// Decodes one image to CHW u8 (1 channel for grayscale, 3 for colour).
fn decode(path: &Path) -> Result<(Shape, Vec<u8>), DataError> {
    let reader = image::ImageReader::open(path).map_err(|e| DataError::io(path, e))?;
    let reader = reader.with_guessed_format().map_err(|e| DataError::io(path, e))?;
    let img = reader
        .decode()
        .map_err(|e| DataError::malformed(path, format!("cannot decode image: {e}")))?;
    let (c, w, h, hwc) = if img.color().has_color() {
        let rgb = img.to_rgb8();
        (3, rgb.width() as usize, rgb.height() as usize, rgb.into_raw())
    } else {
        let luma = img.to_luma8();
        (1, luma.width() as usize, luma.height() as usize, luma.into_raw())
    };
    let mut chw = vec![0u8; hwc.len()];
    for (p, px) in hwc.chunks_exact(c).enumerate() {
        for (ch, &v) in px.iter().enumerate() {
            chw[ch * h * w + p] = v;
        }
    }
    let shape = Shape {
        c,
        h,
        w,
        file: path.to_path_buf(),
    };
    Ok((shape, chw))
}

/// Reads every class folder of one split; `first` carries the shape every image must have.
fn load_split(class_dirs: &[PathBuf], first: &mut Option<Shape>) -> Result<LabeledSet, DataError> {
    let (mut pixels, mut labels) = (Vec::new(), Vec::new());
    for (label, class_dir) in class_dirs.iter().enumerate() {
        let files: Vec<PathBuf> = sorted_entries(class_dir)?
            .into_iter()
            .map(|(_, p)| p)
            .filter(|p| is_image(p) && !p.is_dir())
            .collect();
        if files.is_empty() {
            return Err(DataError::malformed(
                class_dir,
                "empty class folder: no .png, .jpg or .jpeg images",
            ));
        }
        for file in files {
            let (shape, chw) = decode(&file)?;
            match first {
                None => *first = Some(shape),
                Some(want) if (want.c, want.h, want.w) != (shape.c, shape.h, shape.w) => {
                    return Err(DataError::malformed(
                        &file,
                        format!(
                            "image is {shape} but {} is {want} (all images must have one size and channel count)",
                            want.file.display()
                        ),
                    ));
                }
                Some(_) => {}
            }
            pixels.extend_from_slice(&chw);
            labels.push(label as i64);
        }
    }
    let s = first.as_ref().expect("a split with images has a first image");
    Ok(LabeledSet {
        images: Images {
            n: labels.len(),
            c: s.c,
            h: s.h,
            w: s.w,
            pixels: Pixels::U8(pixels),
        },
        labels,
    })
}

/// Loads `dir/train/<class>/*` and `dir/test/<class>/*`.
pub(crate) fn load_dir(dir: &Path) -> Result<Dataset, DataError> {
    if !dir.is_dir() {
        return Err(DataError::malformed(dir, format!("not a folder ({LAYOUT})")));
    }
    let (train_dir, test_dir) = (dir.join("train"), dir.join("test"));
    for split in [&train_dir, &test_dir] {
        if !split.is_dir() {
            return Err(DataError::malformed(split, format!("missing ({LAYOUT})")));
        }
    }
    let train_classes = classes(&train_dir)?;
    let test_classes = classes(&test_dir)?;
    for (have, other, have_dir, other_dir) in [
        (&train_classes, &test_classes, &train_dir, &test_dir),
        (&test_classes, &train_classes, &test_dir, &train_dir),
    ] {
        if let Some((name, path)) = have.iter().find(|(n, _)| !other.iter().any(|(m, _)| m == n)) {
            return Err(DataError::malformed(
                path,
                format!(
                    "class `{}` has a folder in {} but not in {} (train/ and test/ need the same class folders)",
                    name.to_string_lossy(),
                    have_dir.display(),
                    other_dir.display()
                ),
            ));
        }
    }
    let mut first = None;
    let train = load_split(
        &train_classes.into_iter().map(|(_, p)| p).collect::<Vec<_>>(),
        &mut first,
    )?;
    let num_classes = test_classes.len();
    let test = load_split(
        &test_classes.into_iter().map(|(_, p)| p).collect::<Vec<_>>(),
        &mut first,
    )?;
    Ok(Dataset {
        source: dir.display().to_string(),
        train,
        test,
        num_classes,
        poison_idx: None,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use image::{GrayImage, Luma, Rgb, RgbImage, Rgba, RgbaImage};

    /// An RGB image whose pixel (x, y) is (x, y, v).
    pub(crate) fn rgb(w: u32, h: u32, v: u8) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| Rgb([x as u8, y as u8, v]))
    }

    fn mkdirs(root: &Path, dirs: &[&str]) {
        for d in dirs {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
    }

    /// train/{cat,dog} with 2 and 1 images, test/{cat,dog} with 1 each; 4x3 RGB.
    fn small(root: &Path) {
        mkdirs(root, &["train/cat", "train/dog", "test/cat", "test/dog"]);
        rgb(4, 3, 10).save(root.join("train/cat/b.png")).unwrap();
        rgb(4, 3, 11).save(root.join("train/cat/a.png")).unwrap();
        rgb(4, 3, 12).save(root.join("train/dog/x.PNG")).unwrap();
        rgb(4, 3, 13).save(root.join("test/cat/1.png")).unwrap();
        rgb(4, 3, 14).save(root.join("test/dog/1.png")).unwrap();
    }

    #[test]
    fn loads_classes_sorted_with_chw_pixels() {
        let dir = tempfile::tempdir().unwrap();
        small(dir.path());
        // Skipped: other extensions, hidden files and folders, nested folders.
        std::fs::write(dir.path().join("train/cat/notes.txt"), b"not an image").unwrap();
        std::fs::write(dir.path().join("train/cat/.hidden.png"), b"junk").unwrap();
        mkdirs(
            dir.path(),
            &[
                "train/.ipynb_checkpoints",
                "test/.ipynb_checkpoints",
                "train/dog/nested",
            ],
        );
        std::fs::write(dir.path().join("train/README"), b"a file beside the classes").unwrap();
        assert!(detect(dir.path()));
        let d = load_dir(dir.path()).unwrap();
        assert_eq!(d.num_classes, 2);
        assert_eq!(d.train.labels, vec![0, 0, 1]);
        assert_eq!(d.test.labels, vec![0, 1]);
        let im = &d.train.images;
        assert_eq!((im.n, im.c, im.h, im.w), (3, 3, 3, 4));
        let px = im.to_u8();
        // Image 0 is cat/a.png (v = 11): R plane holds x, G plane y, B plane 11.
        assert_eq!(&px[..12], &[0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3]);
        assert_eq!(&px[12..24], &[0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]);
        assert_eq!(&px[24..36], &[11; 12]);
        assert_eq!(px[36 + 24], 10, "image 1 is cat/b.png");
        assert_eq!(px[72 + 24], 12, "image 2 is dog/x.PNG");
        // Deterministic.
        assert_eq!(load_dir(dir.path()).unwrap().train, d.train);
    }

    #[test]
    fn grayscale_stays_one_channel_and_alpha_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        mkdirs(dir.path(), &["train/a", "test/a"]);
        GrayImage::from_fn(2, 2, |x, y| Luma([(10 * x + y) as u8]))
            .save(dir.path().join("train/a/g.png"))
            .unwrap();
        GrayImage::from_pixel(2, 2, Luma([200]))
            .save(dir.path().join("test/a/g.png"))
            .unwrap();
        let d = load_dir(dir.path()).unwrap();
        assert_eq!((d.train.images.c, d.train.images.h, d.train.images.w), (1, 2, 2));
        assert_eq!(d.train.images.to_u8(), vec![0, 10, 1, 11]);
        assert_eq!(d.num_classes, 1);

        let dir = tempfile::tempdir().unwrap();
        mkdirs(dir.path(), &["train/a", "test/a"]);
        RgbaImage::from_pixel(2, 1, Rgba([1, 2, 3, 0]))
            .save(dir.path().join("train/a/x.png"))
            .unwrap();
        rgb(2, 1, 9).save(dir.path().join("test/a/y.png")).unwrap();
        let d = load_dir(dir.path()).unwrap();
        assert_eq!(d.train.images.c, 3);
        assert_eq!(d.train.images.to_u8(), vec![1, 1, 2, 2, 3, 3]);
    }

    #[test]
    fn reads_jpeg() {
        let dir = tempfile::tempdir().unwrap();
        mkdirs(dir.path(), &["train/a", "test/a"]);
        let flat = RgbImage::from_pixel(8, 8, Rgb([200, 100, 50]));
        flat.save(dir.path().join("train/a/x.jpg")).unwrap();
        flat.save(dir.path().join("test/a/y.jpeg")).unwrap();
        let d = load_dir(dir.path()).unwrap();
        assert_eq!((d.train.images.c, d.train.images.h, d.train.images.w), (3, 8, 8));
        let px = d.train.images.to_u8();
        for (ch, want) in [200i32, 100, 50].into_iter().enumerate() {
            assert!(
                (i32::from(px[ch * 64]) - want).abs() <= 3,
                "channel {ch}: {}",
                px[ch * 64]
            );
        }
    }

    #[test]
    fn mixed_sizes_and_channels_name_both_files() {
        let dir = tempfile::tempdir().unwrap();
        small(dir.path());
        let bad = dir.path().join("test/dog/2.png");
        rgb(5, 3, 0).save(&bad).unwrap();
        let e = load_dir(dir.path()).unwrap_err().to_string();
        assert_eq!(
            e,
            format!(
                "{}: image is 5x3 RGB but {} is 4x3 RGB (all images must have one size and channel count)",
                bad.display(),
                dir.path().join("train/cat/a.png").display()
            )
        );
        std::fs::remove_file(&bad).unwrap();
        GrayImage::new(4, 3).save(&bad).unwrap();
        let e = load_dir(dir.path()).unwrap_err().to_string();
        assert!(
            e.contains("2.png: image is 4x3 grayscale but") && e.contains("is 4x3 RGB"),
            "{e}"
        );
    }

    #[test]
    fn class_missing_from_a_split_is_named() {
        let dir = tempfile::tempdir().unwrap();
        small(dir.path());
        mkdirs(dir.path(), &["train/emu"]);
        rgb(4, 3, 0).save(dir.path().join("train/emu/1.png")).unwrap();
        let e = load_dir(dir.path()).unwrap_err().to_string();
        assert_eq!(
            e,
            format!(
                "{}: class `emu` has a folder in {} but not in {} (train/ and test/ need the same class folders)",
                dir.path().join("train/emu").display(),
                dir.path().join("train").display(),
                dir.path().join("test").display()
            )
        );
        std::fs::remove_dir_all(dir.path().join("train/emu")).unwrap();
        mkdirs(dir.path(), &["test/ant"]);
        let e = load_dir(dir.path()).unwrap_err().to_string();
        assert!(e.contains("test/ant: class `ant` has a folder in"), "{e}");
    }

    #[test]
    fn empty_class_folder_is_named() {
        let dir = tempfile::tempdir().unwrap();
        small(dir.path());
        std::fs::remove_file(dir.path().join("test/dog/1.png")).unwrap();
        std::fs::write(dir.path().join("test/dog/readme.txt"), b"only text").unwrap();
        let e = load_dir(dir.path()).unwrap_err().to_string();
        assert_eq!(
            e,
            format!(
                "{}: empty class folder: no .png, .jpg or .jpeg images",
                dir.path().join("test/dog").display()
            )
        );
    }

    #[test]
    fn undecodable_image_is_named() {
        let dir = tempfile::tempdir().unwrap();
        small(dir.path());
        let bad = dir.path().join("train/dog/y.png");
        std::fs::write(&bad, b"\x89PNG\r\n\x1a\n but then nothing sensible").unwrap();
        let e = load_dir(dir.path()).unwrap_err().to_string();
        assert!(
            e.starts_with(&format!("{}: cannot decode image:", bad.display())),
            "{e}"
        );
        std::fs::write(&bad, b"plain text with a .png name").unwrap();
        let e = load_dir(dir.path()).unwrap_err().to_string();
        assert!(
            e.starts_with(&format!("{}: cannot decode image:", bad.display())),
            "{e}"
        );
    }

    #[test]
    fn missing_splits_and_classes_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        mkdirs(dir.path(), &["train"]);
        assert!(!detect(dir.path()));
        let e = load_dir(dir.path()).unwrap_err().to_string();
        assert_eq!(e, format!("{}: missing ({LAYOUT})", dir.path().join("test").display()));
        mkdirs(dir.path(), &["test"]);
        let e = load_dir(dir.path()).unwrap_err().to_string();
        assert_eq!(
            e,
            format!("{}: no class folders ({LAYOUT})", dir.path().join("train").display())
        );
        let e = load_dir(&dir.path().join("nope")).unwrap_err().to_string();
        assert!(e.contains("nope: not a folder"), "{e}");
    }
}
