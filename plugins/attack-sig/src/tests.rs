use super::*;
use audit_sdk::schema::{check_enum, Schema};
use audit_sdk::testing::{call, f32_pixels, params, run_through_abi, u8_pixels, TestData};
use audit_sdk::Status;
use serde_json::json;

const PER_IMAGE: usize = 3 * 8 * 8;

fn poison(data: &TestData, overrides: Value, seed: u64) -> Result<Poisoned> {
    Sig.poison(&call(params(SCHEMA, overrides), seed), &data.dataset())
}

fn trigger(data: &TestData, overrides: Value) -> Result<Triggered> {
    Sig.trigger(&call(params(SCHEMA, overrides), 0), &data.dataset())
}

#[test]
fn schema_and_info_are_well_formed() {
    Schema::parse(SCHEMA).unwrap();
    check_enum::<Mode>(SCHEMA, "mode").unwrap();
    let info = Sig::info();
    assert_eq!(info.name, "sig");
    assert_eq!(info.capabilities, abi::AUDIT_CAP_NEEDS_TRAINING_DATA);
    assert_eq!(params(SCHEMA, json!({})).f64("poison_rate").unwrap(), 0.1);
}

#[test]
fn clean_label_poisons_only_the_target_class_and_keeps_labels() {
    let data = TestData::random_u8([1000, 3, 8, 8], 10, 1);
    let d = data.dataset();
    let p = poison(&data, json!({"target": 2, "poison_rate": 0.05}), 3).unwrap();
    assert_eq!(
        p.indices.len(),
        50,
        "round(0.05 * 1000), taken among the 100 target samples"
    );
    assert_eq!(p.labels, d.labels);
    let (src, out) = (d.images.as_u8().unwrap(), u8_pixels(&p.images));
    for n in 0..1000 {
        let changed = src[n * PER_IMAGE..][..PER_IMAGE] != out[n * PER_IMAGE..][..PER_IMAGE];
        let poisoned = p.indices.contains(&(n as i64));
        assert!(!poisoned || d.labels[n] == 2, "sample {n} is not of the target class");
        assert!(poisoned || !changed, "sample {n} changed but was not poisoned");
    }
    assert!(p.report.get("note").is_none());
}

#[test]
fn too_few_target_samples_poisons_all_of_them_and_says_so() {
    let data = TestData::random_u8([1000, 3, 8, 8], 10, 1);
    let p = poison(&data, json!({"target": 0}), 3).unwrap();
    assert_eq!(p.indices, (0..1000).step_by(10).collect::<Vec<i64>>());
    assert_eq!(p.report["n_requested"], 100);
    let q = poison(&data, json!({"poison_rate": 0.2}), 3).unwrap();
    assert_eq!(q.indices.len(), 100);
    assert_eq!(q.report["n_requested"], 200);
    assert!(q.report["note"].as_str().unwrap().contains("target class"));
}

#[test]
fn poison_is_deterministic_and_seed_dependent() {
    let data = TestData::random_u8([1000, 3, 8, 8], 5, 1);
    let a = poison(&data, json!({}), 1).unwrap();
    let b = poison(&data, json!({}), 1).unwrap();
    let c = poison(&data, json!({}), 2).unwrap();
    assert_eq!(a.indices.len(), 100);
    assert_eq!((&a.indices, &a.images), (&b.indices, &b.images));
    assert_ne!(a.indices, c.indices);
}

#[test]
fn signal_is_exact_along_columns_and_clamped() {
    // W = 4, f = 1: delta * sin(pi j / 2) = 0, 40, 0, -40 on every row and channel.
    let mut pixels = vec![128u8; 2 * 4 * 4];
    pixels[4..8].copy_from_slice(&[250, 250, 10, 10]);
    let data = TestData::u8([1, 2, 4, 4], pixels, vec![0], 2);
    let t = trigger(&data, json!({"frequency": 1})).unwrap();
    let out = u8_pixels(&t.images);
    assert_eq!(out[4..8], [250, 255, 10, 0], "clamped to 0..255");
    for row in [0, 2, 3, 4, 5, 6, 7] {
        assert_eq!(out[row * 4..row * 4 + 4], [128, 168, 128, 88], "row {row}");
    }
    assert_eq!(t.target_labels, vec![0]);
}

#[test]
fn f32_images_get_delta_over_255() {
    let data = TestData::f32([1, 1, 1, 4], vec![0.5; 4], vec![1], 2);
    let t = trigger(&data, json!({"frequency": 1, "target": 1})).unwrap();
    let out = f32_pixels(&t.images);
    let want = [0.5, 0.5 + 40.0 / 255.0, 0.5, 0.5 - 40.0 / 255.0];
    for (o, w) in out.iter().zip(want) {
        assert!((o - w).abs() < 1e-6, "{out:?}");
    }
    assert_eq!(t.target_labels, vec![1]);
}

#[test]
fn adaptive_halves_delta_and_lowers_the_rate() {
    let data = TestData::u8([2000, 1, 1, 4], vec![128; 8000], vec![0; 2000], 2);
    let p = poison(&data, json!({"adaptive": true, "frequency": 1}), 0).unwrap();
    assert_eq!(p.indices.len(), 6);
    assert_eq!(p.report["delta"], 20.0);
    let n = p.indices[0] as usize;
    assert_eq!(u8_pixels(&p.images)[n * 4..n * 4 + 4], [128, 148, 128, 108]);
}

#[test]
fn all_to_all_and_bad_targets_are_invalid() {
    let data = TestData::random_u8([10, 3, 8, 8], 10, 1);
    let e = poison(&data, json!({"mode": "all-to-all"}), 0).unwrap_err();
    assert_eq!(e.status, Status::InvalidInput);
    assert!(e.message.contains("all-to-all"), "{}", e.message);
    assert_eq!(
        trigger(&data, json!({"mode": "all-to-all"})).unwrap_err().status,
        Status::InvalidInput
    );
    let e = poison(&data, json!({"target": 10}), 0).unwrap_err();
    assert!(e.message.contains("target"), "{}", e.message);
}

#[test]
fn abi_round_trip_keeps_labels() {
    let data = TestData::random_u8([100, 3, 8, 8], 10, 1);
    let out = run_through_abi(audit_plugin_negotiate, abi::AUDIT_OP_POISON, "{}", 1, &data);
    assert_eq!(out.status, abi::AUDIT_STATUS_OK, "{}", out.message);
    assert_eq!(out.name, "sig");
    assert_eq!(out.labels, data.dataset().labels);
    assert_eq!(out.indices.len(), 10);
    assert!(out.indices.iter().all(|&i| i % 10 == 0));
}
