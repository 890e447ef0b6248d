use audit_nn::tch::Device;
use audit_nn::tch::{self, Kind, Tensor};
use audit_nn::zoo::{self, Arch};
use audit_plugin_common::samples::{to_f64s, to_i64s};
use audit_plugin_common::testing::{
    planted_model as backdoored_model, planted_set as poisoned_set, poisoned_blocks, precision_recall,
    trained_small_cnn, PLANTED_TARGET as TARGET,
};
use audit_sdk::rng::Rng;
use audit_sdk::schema::{self, Schema};
use audit_sdk::testing::{self, TestData};
use audit_sdk::Status;
use serde_json::Value;

use super::*;

#[test]
fn schema_is_valid_and_defaults_parse() {
    Schema::parse(SCHEMA).expect("valid schema");
    let p: Params = testing::params(SCHEMA, json!({})).parse().expect("defaults parse");
    assert!((p.threshold - 2f64.exp()).abs() < 1e-12, "the paper's e^2");
    assert_eq!(
        (p.em_iters, p.split_iters, p.restarts, p.dims, p.ridge, p.poisoned_side),
        (100, 100, 5, 0, 1e-3, Side::CleanShare)
    );
    assert_eq!((p.min_class_size, p.batch_size, p.seed), (10, 512, 0));
    schema::check_enum::<Side>(SCHEMA, "poisoned_side").unwrap();
    schema::check_refused::<Params>(SCHEMA, "poisoned_side").unwrap();
    assert_eq!(
        Scan::info().capabilities,
        audit_sdk::abi::AUDIT_CAP_NEEDS_MODEL
            | audit_sdk::abi::AUDIT_CAP_NEEDS_CLEAN_DATA
            | audit_sdk::abi::AUDIT_CAP_NEEDS_TRAINING_DATA
    );
}

#[test]
fn the_rules_on_fixed_numbers() {
    let index = [Some(0.3), None, Some(7.39), Some(-30.0), Some(7.388), Some(12.0)];
    assert_eq!(flagged(&index, 2f64.exp()), [2, 5], "strictly above, large side only");
    assert_eq!(
        flagged(&[None, None], 0.0),
        Vec::<i64>::new(),
        "no test, nothing flagged"
    );
    // Clean shares 0.2 and 0.01: subgroup 1 holds fewer clean samples for its size.
    assert_eq!(poisoned_side(Side::CleanShare, [400.0, 990.0], [100.0, 10.0]), 1);
    assert_eq!(poisoned_side(Side::CleanShare, [400.0, 990.0], [0.0, 90.0]), 0);
    assert_eq!(
        poisoned_side(Side::CleanShare, [400.0, 990.0], [0.0, 0.0]),
        0,
        "no clean sample: the smaller"
    );
    assert_eq!(poisoned_side(Side::Smaller, [400.0, 990.0], [0.0, 90.0]), 0);
    assert_eq!(poisoned_side(Side::Smaller, [990.0, 400.0], [0.0, 90.0]), 1);
    assert_eq!(target_dims(0, 128, 1000), 100);
    assert_eq!(target_dims(0, 64, 1000), 64, "never above the feature dimension");
    assert_eq!(target_dims(0, 64, 5), 1);
    assert_eq!(target_dims(32, 128, 1000), 32);
}

/// Seeded draws of `r = mu_y + e` with known diagonal covariances: the EM's `S_e` and `S_mu`
/// match the covariances of the drawn residuals and identities (within 5% and 10% on each
/// axis; the EM's residuals are taken around the estimated identities, which costs a factor of
/// about (n - 1) / n = 0.975 for 40 samples a class), and the EM converges. (Compared with the
/// draws, not with the generating covariances: 60 identities give a variance within about 18%.)
#[test]
fn the_global_model_recovers_known_covariances() {
    let _g = testing::torch_lock();
    tch::manual_seed(7);
    let (k, per, d) = (60i64, 40i64, 3i64);
    let opts = (Kind::Double, Device::Cpu);
    let sd_mu = Tensor::from_slice(&[3.0f64, 2.0, 1.0]);
    let sd_e = Tensor::from_slice(&[1.0f64, 1.5, 0.5]);
    let ids = Tensor::randn([k, d], opts) * &sd_mu;
    let y = Tensor::arange(k, (Kind::Int64, Device::Cpu)).repeat_interleave_self_int(per, 0, None);
    let e = Tensor::randn([k * per, d], opts) * &sd_e;
    let x = ids.index_select(0, &y) + &e + 5.0;
    let g = global_model(&x, &y, k, 100, 1e-9).unwrap();
    assert!(g.converged && g.iterations > 1, "{} steps", g.iterations);
    let se = to_f64s(&g.s_e.diag(0)).unwrap();
    let smu = to_f64s(&g.s_mu.diag(0)).unwrap();
    let want_e = to_f64s(&e.var_dim(0i64, true, false)).unwrap();
    let want_mu = to_f64s(&ids.var_dim(0i64, true, false)).unwrap();
    for i in 0..3 {
        assert!((se[i] / want_e[i] - 1.0).abs() < 0.05, "S_e {se:?} vs {want_e:?}");
        assert!((smu[i] / want_mu[i] - 1.0).abs() < 0.1, "S_mu {smu:?} vs {want_mu:?}");
    }
    let off = g.s_e.abs().sum(Kind::Double).double_value(&[]) - se.iter().sum::<f64>();
    assert!(off < 0.3, "independent axes: off-diagonal mass {off}");
}

/// Two whitened blobs of 170 and 30 points eight units apart: the split finds them exactly and
/// its J is large (about 0.15 * 0.85 * 64 = 8.2); one blob alone gives a J near the 2-means gain of
/// one Gaussian (about 2/pi on the top axis, well below 2).
#[test]
fn the_split_separates_two_identities_and_not_one() {
    let _g = testing::torch_lock();
    tch::manual_seed(3);
    let opts = (Kind::Double, Device::Cpu);
    let big = Tensor::randn([170, 5], opts);
    let small = Tensor::randn([30, 5], opts) + Tensor::from_slice(&[8.0f64, 0.0, 0.0, 0.0, 0.0]);
    let z = Tensor::cat(&[big, small], 0);
    let mu = z.mean_dim(0, false, Kind::Double);
    for seed in 0..3 {
        let s = split(&z, &mu, 4, 100, &mut Rng::new(seed));
        let a = to_i64s(&s.assign).unwrap();
        assert!(a[..170].iter().all(|&v| v == a[0]), "seed {seed}");
        assert!(a[170..].iter().all(|&v| v != a[0]), "seed {seed}");
        let best = s.j.max().double_value(&[]);
        assert!(best > 6.0, "J {best}");
    }
    let one = Tensor::randn([200, 5], opts);
    let mu = one.mean_dim(0, false, Kind::Double);
    let s = split(&one, &mu, 4, 100, &mut Rng::new(1));
    let j = s.j.max().double_value(&[]);
    assert!(j > 0.0 && j < 2.0, "J {j}");
}

fn clean_set() -> TestData {
    testing::blocks(500, 33)
}

fn scan(model: &[u8], set: &TestData, clean: &TestData, overrides: Value) -> audit_sdk::Result<Verdict> {
    let params = testing::params(SCHEMA, overrides);
    Scan.scan_with_clean(
        &testing::call(params, 0),
        model,
        Some(&set.dataset()),
        Some(&clean.dataset()),
    )
}

/// The planted case: the target class alone is flagged and its subgroup away from the clean
/// samples is the poisoned samples. Measured: J 1.16e6 for the target against a median of
/// 1,401 (index 3.0e5); subgroups of 200 and 27 training samples, the 50 clean images of the
/// class all in the first; 27 flagged, precision and recall 1.0.
#[test]
fn the_poisoned_class_and_its_poisoned_samples_are_flagged() {
    let _g = testing::torch_lock();
    let (set, poisoned) = poisoned_set();
    let model = backdoored_model();
    let clean = clean_set();
    let v = scan(model, &set, &clean, json!({})).unwrap_or_else(|e| panic!("scan failed: {e:?}"));
    let summary = &v.details["summary"];
    assert!(v.backdoored, "{summary}");
    assert_eq!(v.target_classes, [TARGET], "{summary}");
    assert_eq!(v.details["level"], "sample");
    let pc = &v.details["per_class"][TARGET as usize];
    assert_eq!(pc["samples"], 227);
    assert_eq!(
        v.details["score"], pc["anomaly_index"],
        "the score is the largest index"
    );
    assert_eq!(pc["flagged_samples"].as_u64(), Some(v.suspicious.len() as u64));
    let (precision, recall) = precision_recall(&v.suspicious, &poisoned);
    assert!(
        recall >= 0.9 && precision >= 0.8,
        "precision {precision}, recall {recall}: {summary}"
    );
    assert!(
        v.suspicious.iter().all(|&i| (0..2000).contains(&i)),
        "training indices only"
    );
    // The same seed gives the same verdict; the other rule names the same samples here (the
    // poisoned subgroup is also the smaller one).
    let again = scan(model, &set, &clean, json!({})).unwrap();
    assert_eq!(again.suspicious, v.suspicious);
    let smaller = scan(model, &set, &clean, json!({"poisoned_side": "smaller"})).unwrap();
    assert_eq!(smaller.suspicious, v.suspicious);
}

/// The same images without poisoning, and a model trained on them: no class is flagged, no
/// sample named. Measured: largest J 11.3 (class 2) against a median of 8.2, index 3.39.
#[test]
fn a_clean_model_on_clean_data_is_not_flagged() {
    let _g = testing::torch_lock();
    let (set, _) = poisoned_blocks(2000, 0, TARGET, 21);
    let model = trained_small_cnn(&set, 3, 5);
    let v = scan(&model, &set, &clean_set(), json!({})).unwrap_or_else(|e| panic!("scan failed: {e:?}"));
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
    for (bad, name) in [
        (json!({"ridge": 2.0}), "ridge"),
        (json!({"em_iters": 0}), "em_iters"),
        (json!({"restarts": 0}), "restarts"),
        (json!({"min_class_size": 1}), "min_class_size"),
        (json!({"threshold": -1.0}), "threshold"),
        (json!({"poisoned_side": "larger"}), "poisoned_side"),
    ] {
        let e = given(bad).resolve(SCHEMA).unwrap_err().to_string();
        assert!(e.contains(name), "{e}");
    }
    let model = zoo::to_bytes(&zoo::build(Arch::SmallCnn, [1, 28, 28], 10, 3).unwrap());
    let set = testing::blocks(100, 1);
    let clean = testing::blocks(50, 2);
    // ridge 0 passes the schema's bounds but cannot be inverted: the plugin refuses it.
    let e = scan(&model, &set, &clean, json!({"ridge": 0.0})).unwrap_err();
    assert_eq!(e.status, Status::InvalidInput, "{e}");
    assert!(e.to_string().contains("`ridge`"), "{e}");
    let call = |p: Value| testing::call(testing::params(SCHEMA, p), 0);
    let e = Scan
        .scan_with_clean(&call(json!({})), &model, None, Some(&clean.dataset()))
        .unwrap_err();
    assert!(e.to_string().contains("training set"), "{e}");
    let e = Scan
        .scan_with_clean(&call(json!({})), &model, Some(&set.dataset()), None)
        .unwrap_err();
    assert!(e.to_string().contains("clean subset"), "{e}");
    let e = scan(b"not onnx", &set, &clean, json!({})).unwrap_err();
    assert_eq!(e.status, Status::InvalidInput, "{e}");
    let one_class = TestData::u8([4, 1, 28, 28], vec![0; 4 * 784], vec![2; 4], 10);
    let e = scan(&model, &set, &one_class, json!({})).unwrap_err();
    assert!(e.to_string().contains("at least 2 classes"), "{e}");
    let e = Scan
        .scan_with_clean(
            &testing::cancelled_call(testing::params(SCHEMA, json!({}))),
            &model,
            Some(&set.dataset()),
            Some(&clean.dataset()),
        )
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
    let clean = testing::blocks(50, 2);
    let v = scan(&model, &set, &clean, json!({"min_class_size": 11})).unwrap();
    assert!(!v.backdoored && v.suspicious.is_empty());
    assert_eq!(v.details["score"], Value::Null);
    assert_eq!(v.details["per_class"][0]["j"], Value::Null);
    let v = scan(&model, &set, &clean, json!({})).unwrap();
    assert!(
        v.details["per_class"][0]["j"].as_f64().is_some(),
        "10 samples are tested"
    );
    assert_eq!(v.details["dims"], 5, "50 clean images: 5 dimensions");
    assert_eq!(v.details["reduction"], "pca");
}
