use super::*;
use audit_sdk::schema::Schema;
use statrs::distribution::Continuous;

fn log_likelihood(x: &[f64], shape: f64, scale: f64) -> f64 {
    let g = Gamma::new(shape, 1.0 / scale).unwrap();
    x.iter().map(|&v| g.ln_pdf(v)).sum()
}

#[test]
fn schema_is_valid_and_defaults_parse() {
    Schema::parse(SCHEMA).expect("valid schema");
    let p: Params = audit_sdk::testing::params(SCHEMA, json!({}))
        .parse()
        .expect("defaults parse");
    assert_eq!((p.images, p.steps, p.lr, p.alpha), (30, 300, 0.01, 0.05));
    assert_eq!(MmBd::info().capabilities, audit_sdk::abi::AUDIT_CAP_NEEDS_MODEL);
}

/// The fit recovers a known gamma from its quantiles, and is a maximum of the likelihood.
#[test]
fn gamma_fit_is_the_maximum_likelihood() {
    let truth = Gamma::new(3.0, 0.5).unwrap(); // shape 3, scale 2
    let x: Vec<f64> = (0..400).map(|i| truth.inverse_cdf((i as f64 + 0.5) / 400.0)).collect();
    let (a, s) = fit_gamma(&x).unwrap();
    assert!((a - 3.0).abs() < 0.1 && (s - 2.0).abs() < 0.1, "shape {a} scale {s}");
    let small = [12.1, 14.3, 11.8, 13.0, 15.2, 12.7, 13.9, 14.8, 12.2];
    let (a, s) = fit_gamma(&small).unwrap();
    let best = log_likelihood(&small, a, s);
    for (da, ds) in [
        (1.02, 1.0),
        (0.98, 1.0),
        (1.0, 1.02),
        (1.0, 0.98),
        (1.02, 0.98),
        (0.98, 1.02),
    ] {
        assert!(
            log_likelihood(&small, a * da, s * ds) < best,
            "({da}, {ds}) beats the fit"
        );
    }
    // The mean is matched exactly by the MLE with location 0.
    assert!((a * s - small.iter().sum::<f64>() / 9.0).abs() < 1e-9);
    assert_eq!(fit_gamma(&[1.0, 1.0, 1.0]), None, "all equal: degenerate");
    assert_eq!(fit_gamma(&[1.0, -1.0, 2.0]), None, "not positive");
}

/// An outlier among ten class statistics is flagged, the others' spread is not.
#[test]
fn the_largest_statistic_is_tested_against_the_others() {
    let mut stats = vec![12.1, 14.3, 11.8, 13.0, 15.2, 12.7, 13.9, 14.8, 12.2, 13.5];
    let calm = null_test(&stats).unwrap();
    assert_eq!(calm.target, 4);
    assert!(calm.p_value > 0.05, "{calm:?}");
    stats[7] = 60.0;
    let hot = null_test(&stats).unwrap();
    assert_eq!(hot.target, 7);
    assert!(hot.p_value < 1e-3 && hot.location == 0.0, "{hot:?}");
    // Non-positive null values: shifted below the smallest, still a valid test.
    let shifted = null_test(&[-3.0, -1.0, 0.5, -2.0, 40.0]).unwrap();
    assert!(shifted.location < -3.0 && shifted.target == 4, "{shifted:?}");
    assert!(null_test(&[1.0, 2.0]).is_none(), "two classes: no null");
}

#[test]
fn margin_is_own_logit_minus_the_best_other() {
    let logits = Tensor::from_slice(&[1.0f32, 5.0, 3.0, 2.0, 0.0, 7.0]).view([2, 3]);
    let target = Tensor::from_slice(&[1i64, 0]);
    let m = Vec::<f32>::try_from(margins(&logits, &target)).unwrap();
    assert_eq!(m, [2.0, -5.0]);
}

fn scan(model: &[u8], overrides: serde_json::Value) -> Verdict {
    let params = audit_sdk::testing::params(SCHEMA, overrides);
    MmBd.scan(&audit_sdk::testing::call(params, 0), model, None)
        .unwrap_or_else(|e| panic!("scan failed: {e:?}"))
}

/// A model whose class 3 gets a large constant logit bonus (a shortcut every input takes, as a
/// trigger is) is flagged with target 3; without the bonus class 3 is not singled out.
#[test]
fn a_class_reachable_from_everywhere_is_flagged() {
    let _g = audit_sdk::testing::torch_lock();
    let bytes =
        audit_nn::zoo::to_bytes(&audit_nn::zoo::build(audit_nn::zoo::Arch::SmallCnn, [1, 28, 28], 10, 3).unwrap());
    let quick = json!({"images": 6, "steps": 40});
    let plain = scan(&bytes, quick.clone());
    let stats = |v: &Verdict| -> Vec<f64> { serde_json::from_value(v.details["statistics"].clone()).unwrap() };
    let before = stats(&plain);
    assert_eq!(before.len(), 10);
    assert!(before.iter().all(|s| s.is_finite()));
    let model = audit_nn::Model::load(&bytes, None).unwrap();
    // The logits layer's bias: the last parameter with one value per class.
    let bias = model
        .params
        .iter()
        .rev()
        .find(|p| p.tensor.size() == [10])
        .expect("a bias of 10");
    tch::no_grad(|| {
        let _ = bias.tensor.get(3).f_add_scalar_(15.0).unwrap();
    });
    let boosted = model.export(&[]).unwrap();
    let v = scan(&boosted, quick);
    let after = stats(&v);
    assert!(v.backdoored && v.target_classes == [3], "{:?}", v.details);
    assert!(after[3] > before[3] + 10.0, "{before:?} -> {after:?}");
    assert!(v.details["score"].as_f64().unwrap() < 0.05);
    // Same seed, same answer.
    assert_eq!(stats(&scan(&boosted, json!({"images": 6, "steps": 40}))), after);
}

#[test]
fn bad_input_names_the_parameter_and_cancellation_is_reported() {
    let bytes =
        audit_nn::zoo::to_bytes(&audit_nn::zoo::build(audit_nn::zoo::Arch::SmallCnn, [1, 28, 28], 10, 3).unwrap());
    let params = audit_sdk::testing::params(SCHEMA, json!({"input": "1x28"}));
    let e = MmBd
        .scan(&audit_sdk::testing::call(params, 0), &bytes, None)
        .unwrap_err();
    assert!(e.to_string().contains("parameter `input`"), "{e}");
    let e = MmBd
        .scan(
            &audit_sdk::testing::call(audit_sdk::testing::params(SCHEMA, json!({})), 0),
            b"not onnx",
            None,
        )
        .unwrap_err();
    assert_eq!(e.status, audit_sdk::Status::InvalidInput, "{e}");
    let params = audit_sdk::testing::params(SCHEMA, json!({}));
    let e = MmBd
        .scan(&audit_sdk::testing::cancelled_call(params), &bytes, None)
        .unwrap_err();
    assert_eq!(e.status, audit_sdk::Status::Cancelled, "{e}");
}
