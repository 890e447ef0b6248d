use audit_nn::zoo::{self, Arch};
use audit_plugin_common::testing::{
    planted_model as backdoored_model, planted_set as poisoned_set, poisoned_blocks, precision_recall,
    trained_small_cnn, PLANTED_TARGET as TARGET,
};
use audit_sdk::schema::Schema;
use audit_sdk::testing::{self, TestData};
use audit_sdk::Status;

use super::*;

#[test]
fn schema_is_valid_and_defaults_parse() {
    Schema::parse(SCHEMA).expect("valid schema");
    let p: Params = testing::params(SCHEMA, json!({})).parse().expect("defaults parse");
    assert_eq!(
        (
            p.eps,
            p.multiplier,
            p.threshold,
            p.min_skew,
            p.min_class_size,
            p.batch_size,
            p.seed
        ),
        (0.05, 1.5, 2.0, 1.5, 10, 512, 0)
    );
    assert_eq!(
        SpectralSignatures::info().capabilities,
        audit_sdk::abi::AUDIT_CAP_NEEDS_MODEL | audit_sdk::abi::AUDIT_CAP_NEEDS_TRAINING_DATA
    );
}

#[test]
fn the_removal_count_and_the_flagged_classes_follow_the_rule() {
    assert_eq!(removed(1000, 0.05, 1.5), 75);
    assert_eq!(removed(227, 0.1, 1.5), 34, "floor(34.05)");
    assert_eq!(removed(10, 0.05, 1.5), 0);
    assert_eq!(removed(10, 1.0, 100.0), 10, "never more than the class");
    let index = [Some(0.3), None, Some(2.0), Some(-3.0), Some(5.1), Some(4.0)];
    let skew = [Some(0.1), Some(3.0), Some(1.0), Some(0.0), Some(2.5), Some(0.9)];
    assert_eq!(
        flagged(&index, &skew, 2.0, 1.0),
        [2, 4],
        "class 5's skewness is below 1"
    );
    assert_eq!(flagged(&index, &skew, 5.2, 1.0), Vec::<i64>::new());
    assert_eq!(flagged(&index, &skew, 2.0, 0.0), [2, 4, 5]);
    assert_eq!(
        flagged(&[None, None], &[None, None], 0.0, 0.0),
        Vec::<i64>::new(),
        "no test, nothing flagged"
    );
}

fn scan(model: &[u8], set: &TestData, overrides: Value) -> audit_sdk::Result<Verdict> {
    let params = testing::params(SCHEMA, overrides);
    SpectralSignatures.scan(&testing::call(params, 0), model, Some(&set.dataset()))
}

/// The poisoned class is flagged, alone, and its top `1.5 * eps * n` scores are the poisoned
/// samples: with eps 0.1 (the poison rate's bound, 11.9% here) 34 samples are flagged, so at most
/// 27 / 34 = 0.79 of them can be poisoned. Measured: skewness 2.70 (median 0.07, index 46.7),
/// precision 0.79 and recall 1.0 at eps 0.1, precision 1.0 at the default eps.
#[test]
fn the_poisoned_class_and_its_poisoned_samples_are_flagged() {
    let _g = testing::torch_lock();
    let (set, poisoned) = poisoned_set();
    let model = backdoored_model();
    let v = scan(model, &set, json!({"eps": 0.1})).unwrap_or_else(|e| panic!("scan failed: {e:?}"));
    let summary = &v.details["summary"];
    assert!(v.backdoored, "{summary}");
    assert_eq!(v.target_classes, [TARGET], "{summary}");
    assert_eq!(v.details["level"], "sample");
    let pc = &v.details["per_class"][TARGET as usize];
    assert_eq!(pc["samples"], 227);
    assert_eq!(pc["flagged_samples"], 34);
    assert_eq!(v.suspicious.len(), 34);
    assert_eq!(
        v.details["score"], pc["anomaly_index"],
        "the score is the largest index"
    );
    let (precision, recall) = precision_recall(&v.suspicious, &poisoned);
    assert!(
        recall >= 0.9 && precision >= 0.7,
        "precision {precision}, recall {recall}: {summary}"
    );
    // The default eps (0.05) flags floor(1.5 * 0.05 * 227) = 17 samples, all poisoned.
    let v = scan(model, &set, json!({})).unwrap();
    assert_eq!(v.suspicious.len(), 17);
    let (precision, _) = precision_recall(&v.suspicious, &poisoned);
    assert!(precision >= 0.9, "precision {precision}");
}

/// The same images without poisoning: no class is flagged, no sample named. Measured: largest
/// skewness 0.36 (class 3; median 0.11, index 1.92), so `min_skew` alone would also stop it.
/// (`min_skew` 0 here would let a small fluctuation of the index flag it: the index is the test.)
#[test]
fn a_clean_model_on_clean_data_is_not_flagged() {
    let _g = testing::torch_lock();
    let (set, _) = poisoned_blocks(2000, 0, TARGET, 21);
    let model = trained_small_cnn(&set, 3, 5);
    let v = scan(&model, &set, json!({})).unwrap_or_else(|e| panic!("scan failed: {e:?}"));
    assert!(!v.backdoored, "{}", v.details["summary"]);
    assert!(v.suspicious.is_empty());
    let (p, r) = precision_recall(&v.suspicious, &[3, 4]);
    assert_eq!(
        (p, r),
        (1.0, 0.0),
        "missed poisoned samples are misses, not false positives"
    );
}

#[test]
fn bad_parameters_and_missing_data_are_refused_naming_them() {
    let given = |v: Value| audit_sdk::Params(v.as_object().cloned().unwrap());
    let e = given(json!({"eps": 1.5})).resolve(SCHEMA).unwrap_err().to_string();
    assert!(e.contains("eps"), "{e}");
    let e = given(json!({"min_class_size": 1}))
        .resolve(SCHEMA)
        .unwrap_err()
        .to_string();
    assert!(e.contains("min_class_size"), "{e}");
    let model = zoo::to_bytes(&zoo::build(Arch::SmallCnn, [1, 28, 28], 10, 3).unwrap());
    let params = testing::params(SCHEMA, json!({}));
    let e = SpectralSignatures
        .scan(&testing::call(params, 0), &model, None)
        .unwrap_err();
    assert!(e.to_string().contains("training set"), "{e}");
    let set = testing::blocks(100, 1);
    let e = scan(b"not onnx", &set, json!({})).unwrap_err();
    assert_eq!(e.status, Status::InvalidInput, "{e}");
    let params = testing::params(SCHEMA, json!({}));
    let e = SpectralSignatures
        .scan(&testing::cancelled_call(params), &model, Some(&set.dataset()))
        .unwrap_err();
    assert_eq!(e.status, Status::Cancelled, "{e}");
}

/// Classes below `min_class_size` get no statistic; with fewer than 3 tested classes there is
/// no outlier test and nothing is flagged (an untrained model, 100 images: 10 per class).
#[test]
fn too_few_samples_give_no_test_and_no_flag() {
    let _g = testing::torch_lock();
    let model = zoo::to_bytes(&zoo::build(Arch::SmallCnn, [1, 28, 28], 10, 3).unwrap());
    let set = testing::blocks(100, 1);
    let v = scan(&model, &set, json!({"min_class_size": 11})).unwrap();
    assert!(!v.backdoored && v.suspicious.is_empty());
    assert_eq!(v.details["score"], Value::Null);
    assert_eq!(v.details["per_class"][0]["skewness"], Value::Null);
    let v = scan(&model, &set, json!({})).unwrap();
    assert!(
        v.details["per_class"][0]["skewness"].as_f64().is_some(),
        "10 samples are tested"
    );
}
