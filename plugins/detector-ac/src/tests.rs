use audit_nn::tch::Device;
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
        (p.dims, p.size_threshold, p.silhouette, p.restarts, p.iterations),
        (10, 0.35, 0.1, 10, 50)
    );
    assert_eq!(
        (p.silhouette_samples, p.min_class_size, p.batch_size, p.seed),
        (2000, 10, 512, 0)
    );
    assert_eq!(
        ActivationClustering::info().capabilities,
        audit_sdk::abi::AUDIT_CAP_NEEDS_MODEL | audit_sdk::abi::AUDIT_CAP_NEEDS_TRAINING_DATA
    );
}

#[test]
fn the_rule_needs_a_small_non_empty_cluster_and_a_real_split() {
    assert!(is_poisoned(0.2, 0.3, 0.35, 0.1));
    assert!(is_poisoned(0.35, 0.1, 0.35, 0.1), "both thresholds are inclusive");
    assert!(!is_poisoned(0.36, 0.9, 0.35, 0.1));
    assert!(!is_poisoned(0.2, 0.09, 0.35, 0.1));
    assert!(!is_poisoned(0.0, 0.9, 0.35, 0.1), "an empty cluster is no split");
    assert!(!is_poisoned(0.2, f64::NAN, 0.35, 0.1));
}

/// The silhouette of a labelling worked by hand: points 0, 1 (cluster 0) and 4 (cluster 1) on a
/// line. Point 0: a = 1, b = 4, s = 0.75; point 1: a = 1, b = 3, s = 2/3; point 4 is alone: 0.
/// Mean (0.75 + 0.6667 + 0) / 3 = 0.4722 (scikit-learn gives the same).
#[test]
fn the_silhouette_matches_a_hand_computed_case() {
    let z = Tensor::from_slice(&[0.0f32, 1.0, 4.0]).view([3, 1]);
    let s = silhouette(&z, &Tensor::from_slice(&[0i64, 0, 1])).double_value(&[]);
    assert!((s - (0.75 + 2.0 / 3.0) / 3.0).abs() < 1e-12, "{s}");
    let s = silhouette(&z, &Tensor::from_slice(&[0i64, 0, 0])).double_value(&[]);
    assert!(s.is_nan(), "one cluster: no silhouette");
}

/// Two well-separated Gaussian blobs of 170 and 30 points in 10 dimensions: 2-means recovers
/// them exactly whatever the seed, and the same seed gives the same labels.
#[test]
fn two_means_separates_two_blobs() {
    let _g = testing::torch_lock();
    tch::manual_seed(3);
    let big = Tensor::randn([170, 10], (Kind::Float, Device::Cpu));
    let small = Tensor::randn([30, 10], (Kind::Float, Device::Cpu)) + 6.0;
    let z = Tensor::cat(&[big, small], 0);
    for seed in 0..3 {
        let labels = to_i64s(&two_means(&z, 4, 20, &mut Rng::new(seed))).unwrap();
        let first = labels[0];
        assert!(labels[..170].iter().all(|&l| l == first), "seed {seed}");
        assert!(labels[170..].iter().all(|&l| l != first), "seed {seed}");
    }
    let a = to_i64s(&two_means(&z, 2, 5, &mut Rng::new(9))).unwrap();
    assert_eq!(a, to_i64s(&two_means(&z, 2, 5, &mut Rng::new(9))).unwrap());
}

fn scan(model: &[u8], set: &TestData, overrides: Value) -> audit_sdk::Result<Verdict> {
    let params = testing::params(SCHEMA, overrides);
    ActivationClustering.scan(&testing::call(params, 0), model, Some(&set.dataset()))
}

/// The poisoned class is flagged, alone, and its smaller cluster is the poisoned samples; the
/// same seed gives the same verdict. Measured: share 0.106 (24 samples), silhouette 0.86,
/// precision 1.0, recall 0.89 (3 poisoned samples fell in the large cluster).
#[test]
fn the_poisoned_class_and_its_poisoned_samples_are_flagged() {
    let _g = testing::torch_lock();
    let (set, poisoned) = poisoned_set();
    let model = backdoored_model();
    let v = scan(model, &set, json!({})).unwrap_or_else(|e| panic!("scan failed: {e:?}"));
    let summary = &v.details["summary"];
    assert!(v.backdoored, "{summary}");
    assert_eq!(v.target_classes, [TARGET], "{summary}");
    assert_eq!(v.details["level"], "sample");
    let pc = &v.details["per_class"][TARGET as usize];
    assert_eq!(pc["samples"], 227);
    assert!(pc["silhouette"].as_f64().unwrap() >= 0.1, "{pc}");
    assert_eq!(v.details["score"], pc["smaller_share"], "{summary}");
    let (precision, recall) = precision_recall(&v.suspicious, &poisoned);
    assert!(
        recall >= 0.85 && precision >= 0.9,
        "precision {precision}, recall {recall}: {summary}"
    );
    let again = scan(model, &set, json!({})).unwrap();
    assert_eq!(again.suspicious, v.suspicious);
}

/// The same images without poisoning: no class is flagged, no sample named. Measured: every
/// class's silhouette was at least 0.10, the smallest share 0.38 (class 3, silhouette 0.35):
/// the size rule, not the silhouette, keeps clean classes out here.
#[test]
fn a_clean_model_on_clean_data_is_not_flagged() {
    let _g = testing::torch_lock();
    let (set, _) = poisoned_blocks(2000, 0, TARGET, 21);
    let model = trained_small_cnn(&set, 3, 5);
    let v = scan(&model, &set, json!({})).unwrap_or_else(|e| panic!("scan failed: {e:?}"));
    assert!(!v.backdoored, "{}", v.details["summary"]);
    assert!(v.suspicious.is_empty());
}

#[test]
fn bad_parameters_and_missing_data_are_refused_naming_them() {
    let given = |v: Value| audit_sdk::Params(v.as_object().cloned().unwrap());
    let e = given(json!({"size_threshold": 0.6}))
        .resolve(SCHEMA)
        .unwrap_err()
        .to_string();
    assert!(e.contains("size_threshold"), "{e}");
    let e = given(json!({"restarts": 0})).resolve(SCHEMA).unwrap_err().to_string();
    assert!(e.contains("restarts"), "{e}");
    let model = zoo::to_bytes(&zoo::build(Arch::SmallCnn, [1, 28, 28], 10, 3).unwrap());
    let params = testing::params(SCHEMA, json!({}));
    let e = ActivationClustering
        .scan(&testing::call(params, 0), &model, None)
        .unwrap_err();
    assert!(e.to_string().contains("training set"), "{e}");
    let set = testing::blocks(100, 1);
    let e = scan(b"not onnx", &set, json!({})).unwrap_err();
    assert_eq!(e.status, Status::InvalidInput, "{e}");
    let params = testing::params(SCHEMA, json!({}));
    let e = ActivationClustering
        .scan(&testing::cancelled_call(params), &model, Some(&set.dataset()))
        .unwrap_err();
    assert_eq!(e.status, Status::Cancelled, "{e}");
}
