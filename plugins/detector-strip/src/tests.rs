use std::sync::OnceLock;

use audit_nn::zoo::{self, Arch};
use audit_plugin_common::testing::{poisoned_blocks, precision_recall, trained_small_cnn};
use audit_sdk::schema::{self, Schema};
use audit_sdk::testing::{self, TestData};
use audit_sdk::Status;

use super::*;

#[test]
fn schema_is_valid_and_defaults_parse() {
    Schema::parse(SCHEMA).expect("valid schema");
    let p: Params = testing::params(SCHEMA, json!({})).parse().expect("defaults parse");
    assert_eq!(
        (p.overlays, p.frr, p.z, p.max_inputs, p.blend, p.batch, p.seed),
        (100, 0.01, 3.0, 2000, Blend::Sum, 4096, 0)
    );
    schema::check_enum::<Blend>(SCHEMA, "blend").unwrap();
    assert_eq!(
        Strip::info().capabilities,
        audit_sdk::abi::AUDIT_CAP_NEEDS_MODEL
            | audit_sdk::abi::AUDIT_CAP_NEEDS_CLEAN_DATA
            | audit_sdk::abi::AUDIT_CAP_NEEDS_TRAINING_DATA
    );
}

/// The threshold, the model-level bound, the quantiles and the majority on fixed numbers.
#[test]
fn the_threshold_bound_and_majority_follow_the_rule() {
    let clean: Vec<f64> = (0..200).rev().map(|i| i as f64 / 10.0).collect();
    // Sorted 0.0, 0.1, ..., 19.9: element floor(0.01 * 200) = 2 is 0.2; 0.05 -> element 10.
    assert_eq!(threshold(&clean, 0.01), Some(0.2));
    assert_eq!(threshold(&clean, 0.05), Some(1.0));
    assert_eq!(threshold(&clean, 0.999), Some(19.9), "element 199");
    assert_eq!(threshold(&[], 0.01), None);
    // n 10,000, frr 0.01: mean 100, sd sqrt(99) = 9.95; z 3 -> 129.85.
    assert!((flag_bound(10_000, 0.01, 3.0) - (100.0 + 3.0 * 99f64.sqrt())).abs() < 1e-9);
    assert_eq!(flag_bound(0, 0.01, 3.0), 0.0);
    let sorted = [1.0, 2.0, 3.0, 4.0, 5.0];
    assert_eq!(quantile(&sorted, 0.5), Some(3.0));
    assert_eq!(quantile(&sorted, 0.25), Some(2.0));
    assert_eq!(quantile(&sorted, 0.1), Some(1.4));
    assert_eq!(quantile(&[], 0.5), None);
    let s = summary_stats(&[3.0, 1.0, 2.0]);
    assert_eq!(
        (s["count"].clone(), s["mean"].clone(), s["q50"].clone()),
        (json!(3), json!(2.0), json!(2.0))
    );
    assert_eq!((s["q00"].clone(), s["q100"].clone()), (json!(1.0), json!(3.0)));
    assert_eq!(majority(&[2, 0, 2, 1, 2, 0], 3), Some((2, 3)));
    assert_eq!(majority(&[1, 0], 3), Some((0, 1)), "ties go to the smallest class");
    assert_eq!(majority(&[], 3), None);
    assert_eq!(class_counts(&[0, 2, 2, 7, -1], 3), [1, 0, 2]);
}

/// Every input gets distinct overlays, a clean image never itself, and the draws are seeded.
#[test]
fn overlays_are_distinct_seeded_and_never_the_image_itself() {
    let _g = testing::torch_lock();
    tch::manual_seed(4);
    let idx = to_i64s(&overlay_indices(6, 10, 9, Some(3))).unwrap();
    for (r, row) in idx.chunks(9).enumerate() {
        let mut v = row.to_vec();
        v.sort();
        v.dedup();
        assert_eq!(v.len(), 9, "distinct: {row:?}");
        assert!(!row.contains(&(3 + r as i64)), "row {r} drew itself: {row:?}");
        assert!(row.iter().all(|&i| (0..10).contains(&i)));
    }
    tch::manual_seed(4);
    assert_eq!(idx, to_i64s(&overlay_indices(6, 10, 9, Some(3))).unwrap());
    tch::manual_seed(5);
    assert_ne!(idx, to_i64s(&overlay_indices(6, 10, 9, Some(3))).unwrap());
}

/// The backdoor's target class.
const TARGET: i64 = 0;

/// 1,000 block images, the first 11 of each class other than `TARGET` poisoned into it (99 of
/// 1,000, 9.9%): the set and its poisoned indices.
fn poisoned_set() -> (TestData, Vec<i64>) {
    poisoned_blocks(1000, 11, TARGET, 31)
}

/// A small CNN trained 3 epochs on [`poisoned_set`] (trained once per test binary).
fn backdoored_model() -> &'static [u8] {
    static MODEL: OnceLock<Vec<u8>> = OnceLock::new();
    MODEL.get_or_init(|| trained_small_cnn(&poisoned_set().0, 3, 5))
}

/// The clean images the scans get (another seed than the training sets').
fn clean_set() -> TestData {
    testing::blocks(200, 32)
}

/// The scans' parameters: 50 overlays, the first 150 training samples (every poisoned one is
/// among them: the first 11 of each class, indices below 110), 400 blended images per forward
/// pass (CPU-sized).
fn quick() -> Value {
    json!({"overlays": 50, "max_inputs": 150, "batch": 400})
}

fn scan(model: &[u8], train: &TestData, overrides: Value) -> audit_sdk::Result<Verdict> {
    let params = testing::params(SCHEMA, overrides);
    let clean = clean_set();
    Strip.scan_with_clean(
        &testing::call(params, 0),
        model,
        Some(&train.dataset()),
        Some(&clean.dataset()),
    )
}

/// The patched samples keep class 0 under superimposition and are flagged; the model is flagged
/// with target 0. Measured (seed 0, [`quick`]): 72 of the 150 judged flagged, all predicted 0,
/// precision 0.986, recall 0.717 (threshold 2.7e-13 bits: this toy model is confident on most
/// blends, clean median entropy 0.004 bits; with 20 overlays recall was 0.34, with 100 on all
/// 1,000 samples 0.72 at precision 0.96). Bounds with margin: precision >= 0.8, recall >= 0.5.
#[test]
fn the_patched_samples_of_a_backdoored_model_are_flagged() {
    let _g = testing::torch_lock();
    let (set, truth) = poisoned_set();
    let v = scan(backdoored_model(), &set, quick()).unwrap_or_else(|e| panic!("scan failed: {e:?}"));
    let (precision, recall) = precision_recall(&v.suspicious, &truth);
    eprintln!(
        "{}: precision {precision:.3}, recall {recall:.3} ({:.1}s)",
        v.details["summary"], v.details["seconds"]
    );
    assert!(v.backdoored, "{}", v.details["summary"]);
    assert_eq!(v.target_classes, [TARGET], "{}", v.details["summary"]);
    assert!(
        recall >= 0.5 && precision >= 0.8,
        "precision {precision}, recall {recall}"
    );
    assert_eq!(v.details["level"], "input");
    assert_eq!(v.details["n_judged"], 150);
    assert_eq!(v.details["n_flagged"], v.suspicious.len());
    let per_class: Vec<usize> = serde_json::from_value(v.details["flagged_per_predicted_class"].clone()).unwrap();
    assert_eq!(per_class.iter().sum::<usize>(), v.suspicious.len());
    // Same seed, same flags; max_inputs judges a prefix.
    let short = |seed: u64| {
        scan(
            backdoored_model(),
            &set,
            json!({"overlays": 4, "max_inputs": 40, "seed": seed}),
        )
        .unwrap()
    };
    let a = short(0);
    assert_eq!(a.details["n_judged"], 40);
    assert!(a.suspicious.iter().all(|&i| i < 40));
    assert_eq!(a.details["judged_entropy"], short(0).details["judged_entropy"]);
    assert_ne!(a.details["judged_entropy"], short(1).details["judged_entropy"]);
}

/// The same training without poisoning: not flagged. Measured (seed 0, [`quick`]): 0 of 150
/// flagged (bound 5.2); with 20 overlays on the first 300, 8 (bound 8.2), and with 100 overlays
/// on all 1,000, 9 (bound 19.4): the training images are fit better than the clean test images,
/// so they fall below the clean quantile somewhat more often than frr.
#[test]
fn a_clean_model_is_not_flagged() {
    let _g = testing::torch_lock();
    let set = testing::blocks(1000, 31);
    let t = std::time::Instant::now();
    let model = trained_small_cnn(&set, 3, 5);
    eprintln!("trained in {:.1}s", t.elapsed().as_secs_f64());
    let v = scan(&model, &set, quick()).unwrap_or_else(|e| panic!("scan failed: {e:?}"));
    eprintln!("{} ({:.1}s)", v.details["summary"], v.details["seconds"]);
    assert!(!v.backdoored, "{}", v.details["summary"]);
    assert!(v.target_classes.is_empty());
}

#[test]
fn bad_parameters_and_missing_data_are_refused_naming_them() {
    let e = Params::default_resolve(json!({"overlays": 0}));
    assert!(e.contains("overlays"), "{e}");
    let e = Params::default_resolve(json!({"blend": "average"}));
    assert!(e.contains("blend"), "{e}");
    let model = zoo::to_bytes(&zoo::build(Arch::SmallCnn, [1, 28, 28], 10, 3).unwrap());
    let train = testing::blocks(20, 1);
    let e = scan(&model, &train, json!({"frr": 0.0})).unwrap_err();
    assert_eq!(e.status, Status::InvalidInput);
    assert!(e.to_string().contains("parameter `frr`"), "{e}");
    let params = testing::params(SCHEMA, json!({}));
    let clean = clean_set();
    let e = Strip
        .scan_with_clean(&testing::call(params.clone(), 0), &model, Some(&train.dataset()), None)
        .unwrap_err();
    assert!(e.to_string().contains("clean subset"), "{e}");
    let e = Strip
        .scan_with_clean(&testing::call(params.clone(), 0), &model, None, Some(&clean.dataset()))
        .unwrap_err();
    assert!(e.to_string().contains("training set"), "{e}");
    let e = scan(b"not onnx", &train, json!({})).unwrap_err();
    assert_eq!(e.status, Status::InvalidInput, "{e}");
    let e = Strip
        .scan_with_clean(
            &testing::cancelled_call(params),
            &model,
            Some(&train.dataset()),
            Some(&clean.dataset()),
        )
        .unwrap_err();
    assert_eq!(e.status, Status::Cancelled, "{e}");
}

impl Params {
    /// The error of resolving `overrides` against the schema (as the host does).
    fn default_resolve(overrides: Value) -> String {
        audit_sdk::Params(overrides.as_object().cloned().unwrap())
            .resolve(SCHEMA)
            .unwrap_err()
            .to_string()
    }
}
