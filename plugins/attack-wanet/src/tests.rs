use super::*;
use audit_attack_common::Mode;
use audit_sdk::schema::{check_enum, Schema};
use audit_sdk::testing::{call, f32_pixels, params, run_through_abi, u8_pixels, TestData};
use audit_sdk::Status;
use serde_json::json;

const SHAPE: [usize; 4] = [1000, 3, 16, 16];
const PER_IMAGE: usize = 3 * 16 * 16;

fn poison(data: &TestData, overrides: Value, seed: u64) -> Result<Poisoned> {
    WaNet.poison(&call(params(SCHEMA, overrides), seed), &data.dataset())
}

fn trigger(data: &TestData, overrides: Value) -> Result<Triggered> {
    WaNet.trigger(&call(params(SCHEMA, overrides), 0), &data.dataset())
}

/// Smooth images (sums of low-frequency waves plus a little noise), so a sub-pixel warp makes small
/// changes and keeps the mean.
fn smooth_u8(n: usize, h: usize, w: usize, seed: u64) -> TestData {
    let mut rng = Rng::new(seed);
    let mut px = Vec::with_capacity(n * 3 * h * w);
    for _ in 0..n * 3 {
        let (a, b, phase) = (rng.uniform(0.5, 2.0), rng.uniform(0.5, 2.0), rng.uniform(0.0, 6.0));
        for y in 0..h {
            for x in 0..w {
                let v =
                    128.0 + 100.0 * (a * x as f64 / 3.0 + b * y as f64 / 4.0 + phase).sin() + rng.uniform(-5.0, 5.0);
                px.push(v.round().clamp(0.0, 255.0) as u8);
            }
        }
    }
    TestData::u8([n, 3, h, w], px, (0..n).map(|i| (i % 10) as i64).collect(), 10)
}

fn mean(v: &[u8]) -> f64 {
    v.iter().map(|&x| f64::from(x)).sum::<f64>() / v.len() as f64
}

#[test]
fn schema_and_info_are_well_formed() {
    Schema::parse(SCHEMA).unwrap();
    check_enum::<Mode>(SCHEMA, "mode").unwrap();
    let info = WaNet::info();
    assert_eq!(info.name, "wanet");
    assert_eq!(info.capabilities, abi::AUDIT_CAP_NEEDS_TRAINING_DATA);
}

#[test]
fn control_field_is_normalised_and_upsampling_keeps_control_points() {
    let f = warp::control_field(4, 3);
    assert_eq!(f.len(), 32);
    let mean_abs = f.iter().map(|v| v.abs()).sum::<f64>() / 32.0;
    assert!((mean_abs - 1.0).abs() < 1e-12);
    assert_ne!(f, warp::control_field(4, 4));
    // align_corners: same size is the identity; the corners of a larger output are the corners.
    let plane = &f[..16];
    let same = warp::upsample_bicubic(plane, 4, 4, 4);
    for (a, b) in same.iter().zip(plane) {
        assert!((a - b).abs() < 1e-12);
    }
    let big = warp::upsample_bicubic(plane, 4, 31, 31);
    assert!((big[0] - plane[0]).abs() < 1e-12 && (big[31 * 31 - 1] - plane[15]).abs() < 1e-12);
    // Position 10 of 31 maps exactly onto control point 1 (10 * 3 / 30).
    assert!((big[10] - plane[1]).abs() < 1e-12);
    let flat = warp::upsample_bicubic(&[2.5; 16], 4, 9, 7);
    assert!(flat.iter().all(|v| (v - 2.5).abs() < 1e-12));
}

#[test]
fn grid_stays_in_range_even_for_large_strength() {
    let g = warp::Grid::warp(4, 100.0, 0, 8, 8);
    assert!(g.x.iter().chain(&g.y).all(|v| (-1.0..=1.0).contains(v)));
    let n = g.with_noise(&mut Rng::new(1));
    assert!(n.x.iter().chain(&n.y).all(|v| (-1.0..=1.0).contains(v)));
    let id = warp::Grid::identity(3, 5);
    assert_eq!(id.x[..5], [-1.0, -0.5, 0.0, 0.5, 1.0]);
    assert_eq!(id.y[..5], [-1.0; 5]);
}

#[test]
fn zero_strength_is_the_identity_for_u8_and_f32() {
    let data = TestData::random_u8([5, 3, 16, 12], 2, 1);
    let t = trigger(&data, json!({"strength": 0.0})).unwrap();
    assert_eq!(u8_pixels(&t.images), data.dataset().images.as_u8().unwrap());
    let data = TestData::random_f32([5, 3, 16, 12], 2, 1);
    let t = trigger(&data, json!({"strength": 0.0})).unwrap();
    assert_eq!(f32_pixels(&t.images), data.dataset().images.as_f32().unwrap());
}

#[test]
fn warp_changes_images_but_keeps_their_mean() {
    let data = smooth_u8(50, 32, 32, 2);
    let src = data.dataset().images.as_u8().unwrap();
    let t = trigger(&data, json!({"strength": 1.0})).unwrap();
    let out = u8_pixels(&t.images);
    let changed = src.iter().zip(out).filter(|(a, b)| a != b).count();
    assert!(
        changed > src.len() / 4,
        "only {changed} of {} pixels changed",
        src.len()
    );
    assert!(
        (mean(src) - mean(out)).abs() < 1.0,
        "mean {} -> {}",
        mean(src),
        mean(out)
    );
    let max_diff = src
        .iter()
        .zip(out)
        .map(|(&a, &b)| (i32::from(a) - i32::from(b)).abs())
        .max()
        .unwrap();
    assert!(max_diff < 128, "a sub-pixel warp moved a pixel by {max_diff}");
}

#[test]
fn poison_marks_exact_count_adds_label_keeping_cross_samples() {
    let data = smooth_u8(SHAPE[0], 16, 16, 1);
    let d = data.dataset();
    let p = poison(&data, json!({"target": 0}), 8).unwrap();
    assert_eq!(p.indices.len(), 50);
    let cross: Vec<i64> = serde_json::from_value(p.report["cross_indices"].clone()).unwrap();
    assert_eq!(cross.len(), 100);
    assert_eq!(p.report["n_cross"], 100);
    let (src, out) = (d.images.as_u8().unwrap(), u8_pixels(&p.images));
    for n in 0..SHAPE[0] {
        let image = |v: &[u8]| v[n * PER_IMAGE..][..PER_IMAGE].to_vec();
        let (is_p, is_c) = (p.indices.contains(&(n as i64)), cross.contains(&(n as i64)));
        assert!(!(is_p && is_c), "sample {n} is both poisoned and cross");
        if is_p {
            assert_ne!(d.labels[n], 0);
            assert_eq!(p.labels[n], 0);
        } else {
            assert_eq!(p.labels[n], d.labels[n], "sample {n} relabelled");
        }
        assert_eq!(image(src) != image(out), is_p || is_c, "sample {n}");
    }
}

#[test]
fn poison_is_deterministic_and_seed_dependent() {
    let data = TestData::random_u8([400, 3, 8, 8], 4, 1);
    let a = poison(&data, json!({}), 1).unwrap();
    let b = poison(&data, json!({}), 1).unwrap();
    let c = poison(&data, json!({}), 2).unwrap();
    assert_eq!((&a.indices, &a.images, &a.report), (&b.indices, &b.images, &b.report));
    assert_ne!(a.indices, c.indices);
    assert_ne!(a.report["cross_indices"], c.report["cross_indices"]);
}

#[test]
fn trigger_uses_the_poison_warp_and_grid_seed_changes_it() {
    let data = smooth_u8(200, 16, 16, 3);
    let p = poison(&data, json!({"target": 1}), 5).unwrap();
    let t = trigger(&data, json!({"target": 1})).unwrap();
    assert_eq!(t.target_labels, vec![1; 200]);
    let (pp, tp) = (u8_pixels(&p.images), u8_pixels(&t.images));
    for &n in &p.indices {
        let n = n as usize;
        assert_eq!(pp[n * PER_IMAGE..][..PER_IMAGE], tp[n * PER_IMAGE..][..PER_IMAGE]);
    }
    let other = trigger(&data, json!({"target": 1, "grid_seed": 1})).unwrap();
    assert_ne!(u8_pixels(&other.images), tp);
}

#[test]
fn f32_images_are_warped_like_u8_images() {
    let u = smooth_u8(4, 16, 16, 4);
    let f = TestData::f32(
        [4, 3, 16, 16],
        u.dataset()
            .images
            .as_u8()
            .unwrap()
            .iter()
            .map(|&v| f32::from(v) / 255.0)
            .collect(),
        vec![0; 4],
        10,
    );
    let tu = trigger(&u, json!({"strength": 2.0})).unwrap();
    let tf = trigger(&f, json!({"strength": 2.0})).unwrap();
    for (&a, &b) in u8_pixels(&tu.images).iter().zip(f32_pixels(&tf.images)) {
        assert!((f32::from(a) - b * 255.0).abs() <= 0.51, "{a} vs {}", b * 255.0);
    }
}

#[test]
fn all_to_all_and_adaptive() {
    let data = TestData::random_u8([2000, 1, 8, 8], 10, 1);
    let d = data.dataset();
    let p = poison(&data, json!({"mode": "all-to-all"}), 2).unwrap();
    assert_eq!(p.indices.len(), 100);
    for &i in &p.indices {
        assert_eq!(p.labels[i as usize], (d.labels[i as usize] + 1) % 10);
    }
    let a = poison(&data, json!({"adaptive": true}), 2).unwrap();
    assert_eq!(a.indices.len(), 6);
    assert_eq!(a.report["strength"], 0.25);
    assert_eq!(a.report["n_cross"], 12);
}

#[test]
fn cross_samples_are_capped_by_what_is_left() {
    let data = TestData::random_u8([100, 1, 8, 8], 2, 1);
    let p = poison(&data, json!({"poison_rate": 0.4, "mode": "all-to-all"}), 0).unwrap();
    assert_eq!(p.indices.len(), 40);
    assert_eq!(p.report["n_cross"], 60);
    assert!(p.report["cross_note"].as_str().unwrap().contains("80"));
}

#[test]
fn invalid_target_is_rejected() {
    let data = TestData::random_u8([10, 3, 8, 8], 10, 1);
    let e = poison(&data, json!({"target": 10}), 0).unwrap_err();
    assert_eq!(e.status, Status::InvalidInput);
    assert!(e.message.contains("target"), "{}", e.message);
}

#[test]
fn abi_round_trip_matches_the_direct_call() {
    let data = TestData::random_u8([100, 3, 8, 8], 10, 1);
    let out = run_through_abi(audit_plugin_negotiate, abi::AUDIT_OP_POISON, r#"{"k":3}"#, 6, &data);
    assert_eq!(out.status, abi::AUDIT_STATUS_OK, "{}", out.message);
    assert_eq!(out.name, "wanet");
    let direct = poison(&data, json!({"k": 3}), 6).unwrap();
    assert_eq!(out.indices, direct.indices);
    assert_eq!(out.image_bytes, u8_pixels(&direct.images));
    assert_eq!(out.report, direct.report);
}
