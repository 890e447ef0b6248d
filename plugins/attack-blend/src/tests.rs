use super::*;
use audit_attack_common::{Dims, Mode};
use audit_sdk::schema::{check_enum, Schema};
use audit_sdk::testing::{call, f32_pixels, params, run_through_abi, u8_pixels, TestData};
use audit_sdk::Status;
use serde_json::json;

const DIMS: Dims = Dims { c: 3, h: 8, w: 8 };
const PER_IMAGE: usize = 3 * 8 * 8;

fn poison(data: &TestData, overrides: Value, seed: u64) -> Result<Poisoned> {
    Blend.poison(&call(params(SCHEMA, overrides), seed), &data.dataset())
}

fn trigger(data: &TestData, overrides: Value) -> Result<Triggered> {
    Blend.trigger(&call(params(SCHEMA, overrides), 0), &data.dataset())
}

fn write_file(dir: &tempfile::TempDir, name: &str, bytes: &[u8]) -> String {
    let path = dir.path().join(name);
    std::fs::write(&path, bytes).unwrap();
    path.to_str().unwrap().to_string()
}

#[test]
fn schema_and_info_are_well_formed() {
    Schema::parse(SCHEMA).unwrap();
    check_enum::<Mode>(SCHEMA, "mode").unwrap();
    check_enum::<Pattern>(SCHEMA, "pattern").unwrap();
    let info = Blend::info();
    assert_eq!(info.name, "blend");
    assert_eq!(info.capabilities, abi::AUDIT_CAP_NEEDS_TRAINING_DATA);
}

#[test]
fn blend_formula_is_exact_on_known_pixels_u8() {
    let data = TestData::random_u8([4, 3, 8, 8], 2, 1);
    let src = data.dataset().images.as_u8().unwrap();
    let t = trigger(&data, json!({"pattern_seed": 9})).unwrap();
    let out = u8_pixels(&t.images);
    let pattern = pattern::noise(9, DIMS);
    for i in [0, 1, 77, 191, 3 * PER_IMAGE + 100] {
        let p = pattern[i % PER_IMAGE];
        let want = (0.8f32 * f32::from(src[i]) + 0.2 * (p * 255.0)).round() as u8;
        assert_eq!(out[i], want, "element {i}");
    }
    // The checkerboard makes the values easy to check by hand: 0.8 * 100 + 0.2 * 255 = 131.
    let flat = TestData::u8([1, 1, 2, 2], vec![100; 4], vec![0], 2);
    let t = trigger(&flat, json!({"pattern": "checker"})).unwrap();
    assert_eq!(u8_pixels(&t.images), &[131, 80, 80, 131]);
}

#[test]
fn blend_formula_is_exact_on_f32() {
    let data = TestData::random_f32([3, 3, 8, 8], 2, 2);
    let src = data.dataset().images.as_f32().unwrap();
    let t = trigger(&data, json!({"alpha": 0.3})).unwrap();
    let out = f32_pixels(&t.images);
    let pattern = pattern::noise(0, DIMS);
    let a = 0.3f64 as f32;
    for (i, (&x, &y)) in src.iter().zip(out).enumerate() {
        assert_eq!(
            y,
            ((1.0 - a) * x + a * pattern[i % PER_IMAGE]).clamp(0.0, 1.0),
            "element {i}"
        );
    }
}

#[test]
fn pattern_is_fixed_by_pattern_seed_not_by_call_seed() {
    let data = TestData::random_u8([400, 3, 8, 8], 4, 1);
    let p = poison(&data, json!({}), 11).unwrap();
    let t = trigger(&data, json!({})).unwrap();
    let (pp, tp) = (u8_pixels(&p.images), u8_pixels(&t.images));
    assert_eq!(p.indices.len(), 20);
    for &n in &p.indices {
        let n = n as usize;
        assert_eq!(
            pp[n * PER_IMAGE..][..PER_IMAGE],
            tp[n * PER_IMAGE..][..PER_IMAGE],
            "sample {n}"
        );
    }
    assert_ne!(pattern::noise(0, DIMS), pattern::noise(1, DIMS));
    let other = trigger(&data, json!({"pattern_seed": 1})).unwrap();
    assert_ne!(u8_pixels(&other.images), tp);
}

#[test]
fn poison_is_deterministic_exact_in_count_and_leaves_the_rest() {
    let data = TestData::random_u8([1000, 3, 8, 8], 10, 3);
    let d = data.dataset();
    let a = poison(&data, json!({"target": 4}), 5).unwrap();
    let b = poison(&data, json!({"target": 4}), 5).unwrap();
    let c = poison(&data, json!({"target": 4}), 6).unwrap();
    assert_eq!((a.indices.clone(), &a.images), (b.indices, &b.images));
    assert_ne!(a.indices, c.indices);
    assert_eq!(a.indices.len(), 50);
    let (src, out) = (d.images.as_u8().unwrap(), u8_pixels(&a.images));
    for n in 0..1000 {
        let poisoned = a.indices.contains(&(n as i64));
        assert_eq!(
            poisoned,
            a.labels[n] != d.labels[n],
            "sample {n}: relabelled iff poisoned"
        );
        if poisoned {
            assert_ne!(d.labels[n], 4);
            assert_eq!(a.labels[n], 4);
        } else {
            assert_eq!(src[n * PER_IMAGE..][..PER_IMAGE], out[n * PER_IMAGE..][..PER_IMAGE]);
        }
    }
}

#[test]
fn adaptive_halves_alpha_and_lowers_the_rate() {
    let data = TestData::u8([1000, 1, 2, 2], vec![10; 4000], (0..1000).map(|i| i % 2).collect(), 2);
    let p = poison(&data, json!({"adaptive": true, "alpha": 0.4, "pattern": "checker"}), 1).unwrap();
    assert_eq!(p.indices.len(), 3);
    assert_eq!(p.report["alpha"], 0.2);
    let n = p.indices[0] as usize;
    // 0.8 * 10 + 0.2 * 255 = 59 on the white squares, 8 on the black ones.
    assert_eq!(u8_pixels(&p.images)[n * 4..n * 4 + 4], [59, 8, 8, 59]);
}

#[test]
fn all_to_all_relabels_to_the_next_class() {
    let data = TestData::random_u8([100, 3, 8, 8], 3, 1);
    let d = data.dataset();
    let p = poison(&data, json!({"mode": "all-to-all", "poison_rate": 0.5}), 2).unwrap();
    assert_eq!(p.indices.len(), 50);
    for &i in &p.indices {
        assert_eq!(p.labels[i as usize], (d.labels[i as usize] + 1) % 3);
    }
}

#[test]
fn pgm_and_ppm_files_are_resized_and_mapped_to_channels() {
    let dir = tempfile::tempdir().unwrap();
    // 2x2 grey checker with a header comment; on 4x4 images each file pixel covers a 2x2 block.
    let pgm = write_file(&dir, "p.pgm", b"P5\n# a comment\n2 2\n255\n\xff\x00\x00\xff");
    let data = TestData::u8([1, 3, 4, 4], vec![0; 48], vec![0], 2);
    let t = trigger(&data, json!({"pattern_file": pgm, "alpha": 1.0})).unwrap();
    let out = u8_pixels(&t.images);
    let block = [255, 255, 0, 0, 255, 255, 0, 0, 0, 0, 255, 255, 0, 0, 255, 255];
    for c in 0..3 {
        assert_eq!(out[c * 16..c * 16 + 16], block, "channel {c}");
    }
    assert_eq!(t.report["pattern"], "file");
    // A 1x1 RGB file on grey images: luma of (255, 0, 0) = 0.299 * 255 = 76.2.
    let ppm = write_file(&dir, "p.ppm", b"P6 1 1 255 \xff\x00\x00");
    let grey = TestData::u8([1, 1, 2, 2], vec![0; 4], vec![0], 2);
    let t = trigger(&grey, json!({"pattern_file": ppm, "alpha": 1.0})).unwrap();
    assert_eq!(u8_pixels(&t.images), &[76; 4]);
    // 16-bit samples.
    let wide = write_file(&dir, "w.pgm", b"P5 1 1 65535\n\x80\x00");
    let t = trigger(&grey, json!({"pattern_file": wide, "alpha": 1.0})).unwrap();
    assert_eq!(u8_pixels(&t.images), &[128; 4]);
}

#[test]
fn bad_pattern_files_are_invalid_and_named() {
    let dir = tempfile::tempdir().unwrap();
    let data = TestData::random_u8([2, 3, 4, 4], 2, 1);
    let missing = dir.path().join("missing.pgm").to_str().unwrap().to_string();
    let png = write_file(&dir, "x.png", b"\x89PNG....");
    let short = write_file(&dir, "short.ppm", b"P6 4 4 255\n\x00\x00");
    for path in [missing, png, short] {
        let e = trigger(&data, json!({"pattern_file": path})).unwrap_err();
        assert_eq!(e.status, Status::InvalidInput);
        assert!(e.message.contains(&path), "{}", e.message);
    }
    let rgb = write_file(&dir, "rgb.ppm", b"P6 1 1 255\n\x00\x00\x00");
    let two_channels = TestData::random_u8([1, 2, 4, 4], 2, 1);
    assert!(trigger(&two_channels, json!({"pattern_file": rgb})).is_err());
}

#[test]
fn invalid_target_is_rejected() {
    let data = TestData::random_u8([10, 3, 8, 8], 10, 1);
    let e = poison(&data, json!({"target": 12}), 0).unwrap_err();
    assert_eq!(e.status, Status::InvalidInput);
    assert!(e.message.contains("target"), "{}", e.message);
}

#[test]
fn abi_round_trip_matches_the_direct_call() {
    let data = TestData::random_f32([100, 3, 8, 8], 10, 1);
    let out = run_through_abi(
        audit_plugin_negotiate,
        abi::AUDIT_OP_POISON,
        r#"{"alpha":0.5}"#,
        3,
        &data,
    );
    assert_eq!(out.status, abi::AUDIT_STATUS_OK, "{}", out.message);
    assert_eq!(out.name, "blend");
    let direct = poison(&data, json!({"alpha": 0.5}), 3).unwrap();
    assert_eq!(out.indices, direct.indices);
    let bytes: Vec<u8> = f32_pixels(&direct.images)
        .iter()
        .flat_map(|v| v.to_ne_bytes())
        .collect();
    assert_eq!(out.image_bytes, bytes);
}
