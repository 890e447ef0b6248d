//! Dataset formats through the real binary: CIFAR-10/100 binary folders and image folders
//! (`train/<class>/*.png`) are detected by `--data`, forced by `--data-format`, fed to the bundled
//! attacks, and bad ones are refused with exit code 2 naming the file.

use std::path::Path;

use audit_tests::audit;
use serde_json::Value;

/// A small deterministic byte stream (xorshift), so the test data needs no extra crate.
struct Bytes(u64);

impl Bytes {
    fn next(&mut self) -> u8 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 24) as u8
    }
    fn take(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next()).collect()
    }
}

/// `n` CIFAR records: `label_bytes` label bytes (each below `classes`), then 3x32x32 random pixels.
fn cifar_records(rng: &mut Bytes, n: usize, label_bytes: usize, classes: u8) -> Vec<u8> {
    let mut out = Vec::new();
    for _ in 0..n {
        for _ in 0..label_bytes {
            out.push(rng.next() % classes);
        }
        out.extend(rng.take(3072));
    }
    out
}

/// A CIFAR-10 binary folder: 5 training batches of 40 records (200 in all) and 50 test records.
fn write_cifar10(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let mut rng = Bytes(0x5eed_c1fa);
    for b in 1..=5 {
        std::fs::write(
            dir.join(format!("data_batch_{b}.bin")),
            cifar_records(&mut rng, 40, 1, 10),
        )
        .unwrap();
    }
    std::fs::write(dir.join("test_batch.bin"), cifar_records(&mut rng, 50, 1, 10)).unwrap();
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// An uncompressed 8-bit RGB PNG of `w` x `h` random pixels (stored deflate blocks, no crate needed).
fn png(rng: &mut Bytes, w: u32, h: u32) -> Vec<u8> {
    let mut raw = Vec::new();
    for _ in 0..h {
        raw.push(0); // filter: none
        raw.extend(rng.take(3 * w as usize));
    }
    let mut zlib = vec![0x78, 0x01];
    let chunks: Vec<&[u8]> = raw.chunks(65_535).collect();
    for (i, block) in chunks.iter().enumerate() {
        zlib.push(u8::from(i + 1 == chunks.len()));
        let len = block.len() as u16;
        zlib.extend(len.to_le_bytes());
        zlib.extend((!len).to_le_bytes());
        zlib.extend_from_slice(block);
    }
    let (mut a, mut b) = (1u32, 0u32);
    for &x in &raw {
        a = (a + u32::from(x)) % 65_521;
        b = (b + a) % 65_521;
    }
    zlib.extend(((b << 16) | a).to_be_bytes());

    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut chunk = |kind: &[u8], data: &[u8]| {
        out.extend((data.len() as u32).to_be_bytes());
        let body = [kind, data].concat();
        out.extend_from_slice(&body);
        out.extend(crc32(&body).to_be_bytes());
    };
    let ihdr = [&w.to_be_bytes()[..], &h.to_be_bytes(), &[8, 2, 0, 0, 0]].concat();
    chunk(b"IHDR", &ihdr);
    chunk(b"IDAT", &zlib);
    chunk(b"IEND", &[]);
    out
}

/// An image folder: classes `ant`, `bee`, `cat`; 4 training and 2 test 8x8 RGB PNGs each.
fn write_image_folder(dir: &Path) {
    let mut rng = Bytes(0x1a6e_f01d);
    for (split, per_class) in [("train", 4), ("test", 2)] {
        for class in ["ant", "bee", "cat"] {
            let d = dir.join(split).join(class);
            std::fs::create_dir_all(&d).unwrap();
            for i in 0..per_class {
                std::fs::write(d.join(format!("{i}.png")), png(&mut rng, 8, 8)).unwrap();
            }
            std::fs::write(d.join("labels.txt"), class).unwrap(); // skipped: not an image
        }
    }
}

fn run_plugin(plugin: &str, op: &str, data: &Path, extra: &[&str]) -> Value {
    let mut args = vec![
        "plugins",
        "run",
        plugin,
        "--op",
        op,
        "--data",
        data.to_str().unwrap(),
        "--json",
    ];
    args.extend_from_slice(extra);
    audit(&args).expect_code(0).json()
}

#[test]
fn cifar10_folder_is_detected_and_poisoned() {
    let dir = tempfile::tempdir().unwrap();
    write_cifar10(dir.path());
    let v = run_plugin("badnets", "poison", dir.path(), &[]);
    assert_eq!(v["data"]["split"], "train");
    assert_eq!(v["data"]["n"], 200, "{v:#}");
    assert_eq!(v["data"]["source"], dir.path().to_str().unwrap());
    // BadNets' default rate is 5%: 10 of 200, each with its corner patch stamped (random pixels are
    // never already white there).
    let picked = v["indices"].as_array().unwrap().len();
    assert_eq!(picked, 10, "{v:#}");
    assert_eq!(v["changed_images"], picked, "{v:#}");

    // The archive's own folder one level down, and the test split for trigger.
    let outer = tempfile::tempdir().unwrap();
    write_cifar10(&outer.path().join("cifar-10-batches-bin"));
    let t = run_plugin("badnets", "trigger", outer.path(), &["--data-format", "cifar10"]);
    assert_eq!(t["data"]["split"], "test");
    assert_eq!(t["data"]["n"], 50, "{t:#}");
    assert_eq!(t["changed_images"], 50, "{t:#}");
}

#[test]
fn cifar100_has_a_hundred_classes() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Bytes(100);
    std::fs::write(dir.path().join("train.bin"), cifar_records(&mut rng, 60, 2, 20)).unwrap();
    std::fs::write(dir.path().join("test.bin"), cifar_records(&mut rng, 20, 2, 20)).unwrap();
    // Target 57 exists only with 100 classes (the fine labels).
    let v = run_plugin("badnets", "poison", dir.path(), &["--param", "target=57"]);
    assert_eq!(v["data"]["n"], 60, "{v:#}");
    assert!(v["changed_labels"].as_u64().unwrap() > 0, "{v:#}");
}

#[test]
fn image_folder_runs_blend_trigger() {
    let dir = tempfile::tempdir().unwrap();
    write_image_folder(dir.path());
    let v = run_plugin("blend", "trigger", dir.path(), &["--data-format", "image-folder"]);
    assert_eq!(v["data"]["split"], "test");
    assert_eq!(v["data"]["n"], 6, "{v:#}");
    assert_eq!(v["changed_images"], 6, "{v:#}");
    // Detected without the flag too, and poisoning reads the 12 training images.
    let p = run_plugin("badnets", "poison", dir.path(), &["--param", "poison_rate=0.25"]);
    assert_eq!(p["data"]["n"], 12, "{p:#}");
    assert_eq!(p["indices"].as_array().unwrap().len(), 3, "{p:#}");
}

#[test]
fn mixed_image_sizes_are_refused_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    write_image_folder(dir.path());
    let odd = dir.path().join("train/bee/9.png");
    std::fs::write(&odd, png(&mut Bytes(9), 8, 9)).unwrap();
    let r = audit(&[
        "plugins",
        "run",
        "blend",
        "--op",
        "poison",
        "--data",
        dir.path().to_str().unwrap(),
    ])
    .expect_code(2);
    let first = dir.path().join("train/ant/0.png");
    assert!(
        r.stderr.contains(&format!(
            "{}: image is 8x9 RGB but {} is 8x8 RGB",
            odd.display(),
            first.display()
        )),
        "{}",
        r.stderr
    );
}

#[test]
fn truncated_cifar_batch_is_refused_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    write_cifar10(dir.path());
    let batch = dir.path().join("data_batch_3.bin");
    let bytes = std::fs::read(&batch).unwrap();
    std::fs::write(&batch, &bytes[..bytes.len() - 1]).unwrap();
    let r = audit(&[
        "plugins",
        "run",
        "badnets",
        "--op",
        "poison",
        "--data",
        dir.path().to_str().unwrap(),
    ])
    .expect_code(2);
    assert!(
        r.stderr
            .contains(&format!("{}: size 122919 bytes is not a multiple", batch.display())),
        "{}",
        r.stderr
    );
}
