use super::*;
use audit_attack_common::Mode;
use audit_sdk::schema::{check_enum, Schema};
use audit_sdk::testing::{call, f32_pixels, params, u8_pixels, TestData};
use audit_sdk::Status;
use serde_json::json;

const SHAPE: [usize; 4] = [1000, 3, 8, 8];
const PER_IMAGE: usize = 3 * 8 * 8;

fn poison(data: &TestData, overrides: Value, seed: u64) -> Result<Poisoned> {
    BadNets.poison(&call(params(SCHEMA, overrides), seed), &data.dataset())
}

fn trigger(data: &TestData, overrides: Value) -> Result<Triggered> {
    BadNets.trigger(&call(params(SCHEMA, overrides), 0), &data.dataset())
}

/// Is `(c, y, x)` inside the patch whose top-left corner is `(row, col)`?
fn in_patch(i: usize, row: usize, col: usize, size: usize) -> bool {
    let (y, x) = ((i % 64) / 8, i % 8);
    (row..row + size).contains(&y) && (col..col + size).contains(&x)
}

#[test]
fn schema_and_info_are_well_formed() {
    Schema::parse(SCHEMA).unwrap();
    check_enum::<Mode>(SCHEMA, "mode").unwrap();
    check_enum::<Position>(SCHEMA, "position").unwrap();
    let info = BadNets::info();
    assert_eq!(info.name, "badnets");
    assert_eq!(info.capabilities, abi::AUDIT_CAP_NEEDS_TRAINING_DATA);
    let p = params(SCHEMA, json!({}));
    assert_eq!(
        (p.i64("patch_size").unwrap(), p.str("position").unwrap()),
        (3, "bottom-right")
    );
}

#[test]
fn poison_is_deterministic_for_a_seed() {
    let data = TestData::random_u8(SHAPE, 10, 1);
    let a = poison(&data, json!({}), 42).unwrap();
    let b = poison(&data, json!({}), 42).unwrap();
    assert_eq!(a.indices, b.indices);
    assert_eq!(a.images, b.images);
    assert_eq!(a.labels, b.labels);
}

#[test]
fn different_seeds_choose_different_samples() {
    let data = TestData::random_u8(SHAPE, 10, 1);
    let a = poison(&data, json!({}), 1).unwrap();
    let b = poison(&data, json!({}), 2).unwrap();
    assert_eq!(a.indices.len(), b.indices.len());
    assert_ne!(a.indices, b.indices);
}

#[test]
fn poisons_exactly_the_rate_outside_the_target_and_relabels() {
    let data = TestData::random_u8(SHAPE, 10, 1);
    let d = data.dataset();
    let p = poison(&data, json!({"target": 3, "poison_rate": 0.1}), 7).unwrap();
    assert_eq!(p.indices.len(), 100);
    assert!(p.indices.windows(2).all(|w| w[0] < w[1]), "indices sorted and unique");
    for (i, (&before, &after)) in d.labels.iter().zip(&p.labels).enumerate() {
        if p.indices.contains(&(i as i64)) {
            assert_ne!(before, 3, "a target-class sample was poisoned");
            assert_eq!(after, 3);
        } else {
            assert_eq!(after, before);
        }
    }
    assert_eq!(p.report["n_poisoned"], 100);
    assert_eq!(p.report["n_total"], 1000);
    assert_eq!(p.report["target"], 3);
}

#[test]
fn patch_is_exactly_in_the_bottom_right_and_nothing_else_changes() {
    let data = TestData::random_u8(SHAPE, 10, 1);
    let before = data.dataset().images.as_u8().unwrap();
    let p = poison(&data, json!({"color": 200}), 3).unwrap();
    let after = u8_pixels(&p.images);
    for n in 0..SHAPE[0] {
        let poisoned = p.indices.contains(&(n as i64));
        for i in 0..PER_IMAGE {
            let (b, a) = (before[n * PER_IMAGE + i], after[n * PER_IMAGE + i]);
            if poisoned && in_patch(i, 5, 5, 3) {
                assert_eq!(a, 200, "sample {n} element {i}");
            } else {
                assert_eq!(a, b, "sample {n} element {i} changed outside the patch");
            }
        }
    }
}

#[test]
fn positions_and_sizes_move_the_patch() {
    let data = TestData::u8([1, 1, 8, 8], vec![0; 64], vec![1], 2);
    for (position, size, row, col) in [
        ("top-left", 2, 0, 0),
        ("top-right", 3, 0, 5),
        ("bottom-left", 1, 7, 0),
        ("center", 4, 2, 2),
    ] {
        let t = trigger(&data, json!({"position": position, "patch_size": size})).unwrap();
        let px = u8_pixels(&t.images);
        for (i, &v) in px.iter().enumerate() {
            assert_eq!(v == 255, in_patch(i, row, col, size), "{position} element {i}");
        }
    }
}

#[test]
fn f32_images_get_color_over_255() {
    let data = TestData::random_f32(SHAPE, 10, 1);
    let before = data.dataset().images.as_f32().unwrap();
    let p = poison(&data, json!({"color": 51}), 3).unwrap();
    let after = f32_pixels(&p.images);
    assert_eq!(p.indices.len(), 50);
    for &n in &p.indices {
        let n = n as usize;
        for i in 0..PER_IMAGE {
            let want = if in_patch(i, 5, 5, 3) {
                51.0 / 255.0
            } else {
                before[n * PER_IMAGE + i]
            };
            assert_eq!(after[n * PER_IMAGE + i], want);
        }
    }
}

#[test]
fn adaptive_lowers_the_rate_and_blends_the_patch_at_half_intensity() {
    let data = TestData::u8(
        [2000, 1, 4, 4],
        vec![100; 2000 * 16],
        (0..2000).map(|i| i % 2).collect(),
        2,
    );
    let p = poison(&data, json!({"adaptive": true, "poison_rate": 0.3}), 5).unwrap();
    assert_eq!(p.indices.len(), 6, "round(0.003 * 2000)");
    assert_eq!(p.report["effective_poison_rate"], 0.003);
    assert_eq!(p.report["patch_intensity"], 0.5);
    let px = u8_pixels(&p.images);
    let n = p.indices[0] as usize;
    // 0.5 * 255 + 0.5 * 100 = 177.5, rounded to nearest.
    assert_eq!(px[n * 16 + 15], 178);
    assert_eq!(px[n * 16], 100);
}

#[test]
fn all_to_all_relabels_to_the_next_class() {
    let data = TestData::random_u8(SHAPE, 10, 1);
    let d = data.dataset();
    let p = poison(&data, json!({"mode": "all-to-all"}), 9).unwrap();
    assert_eq!(p.indices.len(), 50);
    for &i in &p.indices {
        let i = i as usize;
        assert_eq!(p.labels[i], (d.labels[i] + 1) % 10);
    }
    let t = trigger(&data, json!({"mode": "all-to-all"})).unwrap();
    assert_eq!(
        t.target_labels,
        d.labels.iter().map(|y| (y + 1) % 10).collect::<Vec<_>>()
    );
}

#[test]
fn trigger_stamps_every_image_and_asks_for_the_target() {
    let data = TestData::random_u8([20, 3, 8, 8], 4, 2);
    let t = trigger(&data, json!({"target": 2})).unwrap();
    assert_eq!(t.target_labels, vec![2; 20]);
    let px = u8_pixels(&t.images);
    for n in 0..20 {
        for c in 0..3 {
            assert_eq!(px[n * PER_IMAGE + c * 64 + 63], 255);
        }
    }
}

#[test]
fn invalid_target_patch_and_data_are_rejected() {
    let data = TestData::random_u8([10, 3, 8, 8], 10, 1);
    let e = poison(&data, json!({"target": 10}), 0).unwrap_err();
    assert_eq!(e.status, Status::InvalidInput);
    assert!(e.message.contains("target"), "{}", e.message);
    let e = trigger(&data, json!({"patch_size": 9})).unwrap_err();
    assert_eq!(e.status, Status::InvalidInput);
    assert!(e.message.contains("patch_size"), "{}", e.message);
    let empty = TestData::u8([0, 3, 8, 8], vec![], vec![], 10);
    assert_eq!(poison(&empty, json!({}), 0).unwrap_err().status, Status::InvalidInput);
}

#[test]
fn abi_round_trip_poisons_and_reports_errors() {
    use audit_sdk::testing::run_through_abi;
    let data = TestData::random_u8([200, 3, 8, 8], 10, 1);
    let out = run_through_abi(
        audit_plugin_negotiate,
        abi::AUDIT_OP_POISON,
        r#"{"target":1}"#,
        4,
        &data,
    );
    assert_eq!(out.status, abi::AUDIT_STATUS_OK, "{}", out.message);
    assert_eq!(out.name, "badnets");
    assert_eq!(out.schema, SCHEMA);
    assert_eq!(out.capabilities, abi::AUDIT_CAP_NEEDS_TRAINING_DATA);
    assert_eq!(out.image_shape, vec![200, 3, 8, 8]);
    assert_eq!(out.indices.len(), 10);
    assert!(out.indices.iter().all(|&i| out.labels[i as usize] == 1));
    assert_eq!(out.report["n_poisoned"], 10);
    let direct = poison(&data, json!({"target": 1}), 4).unwrap();
    assert_eq!(out.indices, direct.indices);
    assert_eq!(out.image_bytes, u8_pixels(&direct.images));

    let bad = run_through_abi(
        audit_plugin_negotiate,
        abi::AUDIT_OP_TRIGGER,
        r#"{"target":10}"#,
        0,
        &data,
    );
    assert_eq!(bad.status, abi::AUDIT_STATUS_INVALID_INPUT);
    assert!(bad.message.contains("target"), "{}", bad.message);
}
