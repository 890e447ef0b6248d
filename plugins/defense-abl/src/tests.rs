use audit_nn::zoo::{self, Arch};
use audit_sdk::rng::Rng;
use audit_sdk::schema::{check_enum, check_refused, Schema};
use audit_sdk::testing::{self, TestData};
use audit_sdk::{Call, Status};
use serde_json::{json, Value};

use super::*;

/// A zoo small CNN for 1x28x28 inputs and 10 classes.
fn small_cnn(seed: u64) -> Vec<u8> {
    zoo::to_bytes(&zoo::build(Arch::SmallCnn, [1, 28, 28], 10, seed).expect("zoo model"))
}

/// `n` 1x28x28 images of 10 classes, learnable: class k is a bright 6x6 block at one of ten
/// positions (rows 2..20, columns 1..27), over faint noise. About `poison_percent`% of the
/// samples of classes 1..9 get a white 3x3 patch in the bottom-right corner (rows and columns
/// 24..27, clear of every block) and the label 0 (BadNets); their indices are returned.
const NOISE: usize = 120;
const BLOCK: usize = 100;
const JIT: usize = 3;

fn poisoned_blocks(n: usize, poison_percent: usize, seed: u64) -> (TestData, Vec<i64>) {
    let mut rng = Rng::new(seed);
    let mut pixels = vec![0u8; n * 28 * 28];
    let mut labels: Vec<i64> = (0..n).map(|i| (i % 10) as i64).collect();
    let mut poisoned = vec![];
    for (i, y) in labels.iter_mut().enumerate() {
        let img = &mut pixels[i * 784..(i + 1) * 784];
        for p in img.iter_mut() {
            *p = rng.below(NOISE) as u8;
        }
        let k = *y as usize;
        let (r0, c0) = (1 + 12 * (k / 5) + rng.below(JIT), 5 * (k % 5) + rng.below(JIT));
        for r in r0..r0 + 5 {
            for c in c0..c0 + 5 {
                img[r * 28 + c] = (BLOCK + rng.below(60)) as u8;
            }
        }
        if *y != 0 && rng.below(100) < poison_percent {
            for r in 24..27 {
                for c in 24..27 {
                    img[r * 28 + c] = 255;
                }
            }
            *y = 0;
            poisoned.push(i as i64);
        }
    }
    (TestData::u8([n, 1, 28, 28], pixels, labels, 10), poisoned)
}

fn call(overrides: Value, seed: u64) -> Call<'static> {
    testing::call(testing::params(SCHEMA, overrides), seed)
}

fn weights(bytes: &[u8]) -> Vec<Tensor> {
    let m = Model::load(bytes, None).expect("model loads");
    m.trainable().iter().map(|t| t.detach().copy()).collect()
}

/// A quick setting: a few epochs per phase.
fn quick(extra: Value) -> Value {
    let mut v = json!({"isolation_epochs": 3, "train_epochs": 2, "unlearning_epochs": 2, "batch_size": 32});
    for (k, x) in extra.as_object().unwrap() {
        v[k] = x.clone();
    }
    v
}

#[test]
fn schema_is_valid_and_descriptor_matches() {
    let _torch = testing::torch_lock();
    Schema::parse(SCHEMA).expect("valid schema");
    let info = Abl::info();
    assert_eq!(info.name, "abl");
    assert_eq!(
        info.capabilities,
        abi::AUDIT_CAP_NEEDS_TRAINING_DATA | abi::AUDIT_CAP_NEEDS_MODEL
    );
    let p: Params = testing::params(SCHEMA, json!({})).parse().expect("defaults parse");
    p.check().expect("defaults are consistent");
    assert_eq!(
        (
            p.isolation_loss,
            p.gamma,
            p.isolation_epochs,
            p.isolation_ratio,
            p.init,
            p.train_epochs,
            p.unlearning_epochs
        ),
        (IsolationLoss::Lga, 0.5, 20, 0.01, Init::Fresh, 60, 5)
    );
    assert_eq!(
        (
            p.lr,
            p.lr_schedule,
            p.unlearning_lr,
            p.momentum,
            p.weight_decay,
            p.batch_size,
            p.augment,
            p.freeze_bn,
            p.unlearning_stop_accuracy
        ),
        (0.1, LrSchedule::Step, 0.0005, 0.9, 1e-4, 128, false, false, -1.0)
    );
}

#[test]
fn enum_parameters_match_the_schema_and_refuse_other_values() {
    check_enum::<IsolationLoss>(SCHEMA, "isolation_loss").unwrap();
    check_enum::<Init>(SCHEMA, "init").unwrap();
    check_enum::<LrSchedule>(SCHEMA, "lr_schedule").unwrap();
    // A value the host would have refused, given straight to the plugin: an error, not a fallback.
    for key in ["isolation_loss", "init", "lr_schedule"] {
        check_refused::<Params>(SCHEMA, key).unwrap();
    }
    assert_eq!(LrSchedule::Step.schedule(), Schedule::Step { every: 40, gamma: 0.1 });
    assert_eq!(LrSchedule::Cosine.schedule(), Schedule::Cosine { min_lr: 0.0 });
    assert_eq!(LrSchedule::Constant.schedule(), Schedule::Constant);
}

#[test]
fn objectives_match_the_reference_formulas_on_the_batch_mean() {
    let mean = |t: &Tensor| t.mean(Kind::Double).double_value(&[]);
    // Batch mean 0.2, below gamma 0.5: LGA ascends (value -0.2), flooding gives 0.5 + 0.3 = 0.8.
    let low = Tensor::from_slice(&[0.1f32, 0.3]);
    assert!((mean(&Objective::Lga(0.5).per_sample(&low)) + 0.2).abs() < 1e-6);
    assert!((mean(&Objective::Flooding(0.5).per_sample(&low)) - 0.8).abs() < 1e-6);
    // Batch mean 1.0, above gamma: both descend (values 1.0 and 1.0).
    let high = Tensor::from_slice(&[0.5f32, 1.5]);
    assert!((mean(&Objective::Lga(0.5).per_sample(&high)) - 1.0).abs() < 1e-6);
    assert!((mean(&Objective::Flooding(0.5).per_sample(&high)) - 1.0).abs() < 1e-6);
    assert!((mean(&Objective::Ascend.per_sample(&high)) + 1.0).abs() < 1e-6);
    // The same gradient for LGA and flooding: sign(L - gamma) / B per sample.
    for (ce, sign) in [(&low, -1.0), (&high, 1.0)] {
        for obj in [Objective::Lga(0.5), Objective::Flooding(0.5)] {
            let x = ce.copy().set_requires_grad(true);
            obj.per_sample(&x).mean(Kind::Float).backward();
            let g = Vec::<f32>::try_from(&x.grad()).unwrap();
            assert!(
                g.iter().all(|&v| (v as f64 - sign / 2.0).abs() < 1e-6),
                "{obj:?}: {g:?}"
            );
        }
    }
}

#[test]
fn abl_isolates_the_poisoned_samples_and_unlearns() {
    let _torch = testing::torch_lock();
    let model = small_cnn(1);
    let (data, poisoned) = poisoned_blocks(1000, 6, 7);
    let rate = poisoned.len() as f64 / 1000.0;
    assert!((0.03..0.08).contains(&rate), "poison rate {rate}");
    let c = call(quick(json!({"isolation_ratio": 0.02})), 3);
    let h = Abl.defend(&c, &model, Some(&data.dataset()), None).expect("defend");
    let r = &h.report;
    assert_eq!(r["defense"], "abl");
    assert_eq!(r["n_train"], 1000);
    assert_eq!(r["n_isolated"], 20);
    assert_eq!(r["params"]["isolation_epochs"], 3);
    assert_eq!(r["epochs"]["isolation"].as_array().unwrap().len(), 3);
    assert_eq!(r["epochs"]["training"].as_array().unwrap().len(), 2);
    assert_eq!(r["epochs"]["unlearning"].as_array().unwrap().len(), 2);
    assert!(r["epochs"]["isolation"][0]["cross_entropy"]
        .as_f64()
        .unwrap()
        .is_finite());
    // The isolated indices: sorted, distinct, in range, and mostly the poisoned samples.
    assert_eq!(h.dropped.len(), 20);
    assert!(h.dropped.windows(2).all(|w| w[0] < w[1]));
    assert!(h.dropped.iter().all(|&i| (0..1000).contains(&i)));
    let hits = h.dropped.iter().filter(|i| poisoned.contains(i)).count();
    let precision = hits as f64 / 20.0;
    eprintln!("isolation precision {precision}");
    assert!(
        precision >= 0.6,
        "precision {precision} (poison rate {rate}); report {r:#}"
    );
    // The isolated set's majority label is the target.
    let hist: Vec<i64> = serde_json::from_value(r["isolated_label_histogram"].clone()).unwrap();
    assert_eq!(hist.len(), 10);
    assert_eq!(hist.iter().sum::<i64>(), 20);
    assert_eq!(r["suspected_target"], 0);
    let threshold = r["isolation_loss_threshold"].as_f64().unwrap();
    assert!(threshold >= r["isolated_loss_mean"].as_f64().unwrap());
    assert!(threshold < r["train_loss_mean"].as_f64().unwrap());
    let rest = r["rest_accuracy_after_unlearning"].as_f64().unwrap();
    assert!(rest > 0.5, "the model still classifies the rest: {rest}; report {r:#}");
    // Weights changed, the graph did not; the result loads and carries the metadata.
    let (w0, w1) = (weights(&model), weights(&h.model));
    assert_eq!(w0.len(), w1.len());
    assert!(w0.iter().zip(&w1).any(|(x, y)| x.size() == y.size() && !x.equal(y)));
    let m = Model::load(&h.model, None).unwrap();
    assert_eq!(m.metadata("audit.defense"), Some("abl"));
    let stored: Value = serde_json::from_str(m.metadata("audit.defense_params").unwrap()).unwrap();
    assert_eq!(stored["isolation_ratio"], 0.02);
}

#[test]
fn unlearning_ascends_the_loss_of_the_isolated_samples() {
    let _torch = testing::torch_lock();
    // From an untrained model (no isolation or training epochs) the lowest-loss samples are not
    // fitted to float32 precision, so the ascent has a gradient to follow.
    let model = small_cnn(6);
    let (data, _) = poisoned_blocks(400, 6, 9);
    let c = call(
        json!({"init": "model", "isolation_epochs": 0, "train_epochs": 0, "unlearning_epochs": 3, "unlearning_lr": 0.01, "isolation_ratio": 0.05, "batch_size": 32}),
        0,
    );
    let h = Abl.defend(&c, &model, Some(&data.dataset()), None).expect("defend");
    let r = &h.report;
    let (before, after) = (
        r["isolated_loss_before_unlearning"].as_f64().unwrap(),
        r["isolated_loss_after_unlearning"].as_f64().unwrap(),
    );
    assert!(after > before + 0.1, "isolated loss {before} -> {after}; report {r:#}");
    let ce: Vec<f64> = r["epochs"]["unlearning"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["cross_entropy"].as_f64().unwrap())
        .collect();
    assert!(ce.windows(2).all(|w| w[1] > w[0]), "{ce:?}");
    // The logged objective of the ascent is -CE.
    assert!((r["epochs"]["unlearning"][0]["loss"].as_f64().unwrap() + ce[0]).abs() < 1e-6);
    assert!(
        r["isolated_accuracy_after_unlearning"].as_f64().unwrap()
            <= r["isolated_accuracy_before_unlearning"].as_f64().unwrap()
    );
}

#[test]
fn unlearning_stops_early_and_divergence_is_an_error() {
    let _torch = testing::torch_lock();
    let model = small_cnn(7);
    let (data, _) = poisoned_blocks(200, 6, 10);
    let base = json!({"init": "model", "isolation_epochs": 0, "train_epochs": 0, "unlearning_epochs": 4, "isolation_ratio": 0.05, "batch_size": 32});
    // Any accuracy is at or below 1: the phase ends after its first epoch.
    let mut stop = base.clone();
    stop["unlearning_stop_accuracy"] = json!(1.0);
    let h = Abl
        .defend(&call(stop, 0), &model, Some(&data.dataset()), None)
        .expect("defend");
    assert_eq!(h.report["epochs"]["unlearning"].as_array().unwrap().len(), 1);
    assert_eq!(h.report["unlearning_stopped_after_epoch"], 1);
    // Off by default: every epoch runs.
    let h = Abl
        .defend(&call(base.clone(), 0), &model, Some(&data.dataset()), None)
        .expect("defend");
    assert_eq!(h.report["epochs"]["unlearning"].as_array().unwrap().len(), 4);
    assert_eq!(h.report["unlearning_stopped_after_epoch"], Value::Null);
    // An absurd ascent rate diverges: an error, not a model with non-finite weights.
    let mut wild = base;
    wild["unlearning_lr"] = json!(1e12);
    wild["unlearning_epochs"] = json!(20);
    let e = Abl
        .defend(&call(wild, 0), &model, Some(&data.dataset()), None)
        .unwrap_err();
    assert_eq!(e.status, Status::Failed);
    assert!(e.message.contains("diverged"), "{}", e.message);
}

#[test]
fn flooding_from_the_given_weights_runs_and_is_deterministic() {
    let _torch = testing::torch_lock();
    let model = small_cnn(2);
    let (data, _) = poisoned_blocks(200, 6, 8);
    let c = call(
        quick(
            json!({"isolation_loss": "flooding", "init": "model", "freeze_bn": true, "lr_schedule": "cosine", "isolation_epochs": 1, "train_epochs": 1, "unlearning_epochs": 1, "isolation_ratio": 0.05}),
        ),
        0,
    );
    let h = Abl.defend(&c, &model, Some(&data.dataset()), None).expect("defend");
    assert_eq!(h.report["params"]["isolation_loss"], "flooding");
    assert_eq!(h.dropped.len(), 10);
    // Flooding's objective never goes below gamma.
    let floor = h.report["epochs"]["isolation"][0]["loss"].as_f64().unwrap();
    assert!(floor >= 0.5 - 1e-9, "{floor}");
    // The same seed gives the same model and the same isolated samples.
    let again = Abl.defend(&c, &model, Some(&data.dataset()), None).expect("defend");
    assert_eq!(again.model, h.model);
    assert_eq!(again.dropped, h.dropped);
    // Zero epochs everywhere from the given weights: only isolation by loss, weights unchanged.
    let c0 = call(
        json!({"init": "model", "isolation_epochs": 0, "train_epochs": 0, "unlearning_epochs": 0, "isolation_ratio": 0.05}),
        0,
    );
    let h0 = Abl.defend(&c0, &model, Some(&data.dataset()), None).expect("defend");
    let (w0, w1) = (weights(&model), weights(&h0.model));
    assert!(w0.iter().zip(&w1).all(|(a, b)| a.equal(b)));
    assert_eq!(h0.dropped.len(), 10);
    // Unlearning alone with BN frozen: the weights move, the BN running statistics do not.
    let bn_stats = |bytes: &[u8]| -> Vec<Tensor> {
        let m = Model::load(bytes, None).unwrap();
        m.params
            .iter()
            .filter(|p| p.role == audit_nn::ParamRole::BnStat)
            .map(|p| p.tensor.copy())
            .collect()
    };
    for freeze in [true, false] {
        let c1 = call(
            json!({"init": "model", "isolation_epochs": 0, "train_epochs": 0, "unlearning_epochs": 1, "isolation_ratio": 0.05, "freeze_bn": freeze}),
            0,
        );
        let h1 = Abl.defend(&c1, &model, Some(&data.dataset()), None).expect("defend");
        let (w1, s0, s1) = (weights(&h1.model), bn_stats(&model), bn_stats(&h1.model));
        assert!(w0.iter().zip(&w1).any(|(a, b)| !a.equal(b)));
        assert!(!s0.is_empty());
        assert_eq!(
            s0.iter().zip(&s1).all(|(a, b)| a.equal(b)),
            freeze,
            "freeze_bn {freeze}"
        );
    }
}

#[test]
fn missing_empty_or_too_small_training_data_is_invalid() {
    let _torch = testing::torch_lock();
    let model = small_cnn(4);
    let c = call(quick(json!({})), 0);
    let e = Abl.defend(&c, &model, None, None).unwrap_err();
    assert_eq!(e.status, Status::InvalidInput);
    assert!(e.message.contains("training set"), "{}", e.message);
    let empty = TestData::u8([0, 1, 28, 28], vec![], vec![], 10);
    let e = Abl.defend(&c, &model, Some(&empty.dataset()), None).unwrap_err();
    assert_eq!(e.status, Status::InvalidInput);
    // 1% of 50 samples is no sample.
    let (small, _) = poisoned_blocks(50, 6, 1);
    let e = Abl.defend(&c, &model, Some(&small.dataset()), None).unwrap_err();
    assert_eq!(e.status, Status::InvalidInput);
    assert!(e.message.contains("isolates no sample"), "{}", e.message);
    // Images of the wrong size for the model.
    let wrong = TestData::random_u8([400, 3, 8, 8], 10, 1);
    let e = Abl.defend(&c, &model, Some(&wrong.dataset()), None).unwrap_err();
    assert_eq!(e.status, Status::InvalidInput, "{}", e.message);
    assert!(e.message.contains("training set"), "{}", e.message);
    // More classes than the model has outputs.
    let five = zoo::to_bytes(&zoo::build(Arch::SmallCnn, [1, 28, 28], 5, 0).unwrap());
    let (ten, _) = poisoned_blocks(200, 0, 1);
    let e = Abl.defend(&c, &five, Some(&ten.dataset()), None).unwrap_err();
    assert_eq!(e.status, Status::InvalidInput);
    assert!(e.message.contains("only 5 outputs"), "{}", e.message);
}

#[test]
fn cancellation_is_reported() {
    let _torch = testing::torch_lock();
    let c = testing::cancelled_call(testing::params(SCHEMA, quick(json!({}))));
    let (data, _) = poisoned_blocks(200, 6, 2);
    let e = Abl.defend(&c, &small_cnn(5), Some(&data.dataset()), None).unwrap_err();
    assert_eq!(e.status, Status::Cancelled);
}
