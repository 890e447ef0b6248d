use audit_nn::zoo::{self, Arch};
use audit_sdk::schema::{check_enum, check_refused, Schema};
use audit_sdk::testing::{self, TestData};
use audit_sdk::{Call, Status};
use serde_json::{json, Value};

use super::*;
use audit_plugin_common::{FineTuneOptimizer, FineTuneSchedule};

/// A zoo small CNN for 1x28x28 inputs and 10 classes.
fn small_cnn(seed: u64) -> Vec<u8> {
    zoo::to_bytes(&zoo::build(Arch::SmallCnn, [1, 28, 28], 10, seed).expect("zoo model"))
}

fn call(overrides: Value, seed: u64) -> Call<'static> {
    testing::call(testing::params(SCHEMA, overrides), seed)
}

fn weights(bytes: &[u8]) -> Vec<Tensor> {
    let m = Model::load(bytes, None).expect("model loads");
    m.trainable().iter().map(|t| t.detach().copy()).collect()
}

#[test]
fn schema_is_valid_and_descriptor_matches() {
    let _torch = testing::torch_lock();
    Schema::parse(SCHEMA).expect("valid schema");
    let info = Finetune::info();
    assert_eq!(info.name, "finetune");
    assert_eq!(
        info.capabilities,
        abi::AUDIT_CAP_NEEDS_CLEAN_DATA | abi::AUDIT_CAP_NEEDS_MODEL
    );
    let p: Params = testing::params(SCHEMA, json!({})).parse().expect("defaults parse");
    let tune: FineTune = testing::params(SCHEMA, json!({})).parse().expect("defaults parse");
    assert_eq!(p.seed, 0);
    assert_eq!(
        (
            tune.epochs,
            tune.lr,
            tune.batch_size,
            tune.weight_decay,
            tune.optimizer,
            tune.schedule,
            tune.freeze_bn
        ),
        (
            10,
            0.01,
            128,
            5e-4,
            FineTuneOptimizer::Sgd,
            FineTuneSchedule::Cosine,
            false
        )
    );
}

#[test]
fn enum_parameters_match_the_schema_and_refuse_other_values() {
    check_enum::<FineTuneOptimizer>(SCHEMA, "optimizer").unwrap();
    check_enum::<FineTuneSchedule>(SCHEMA, "schedule").unwrap();
    // The report spells them as the schema does.
    assert_eq!(json!(FineTuneOptimizer::Adam), json!("adam"));
    assert_eq!(json!(FineTuneSchedule::Constant), json!("constant"));
    // A value the host would have refused, given straight to the plugin: an error, not a fallback.
    for key in ["optimizer", "schedule"] {
        check_refused::<FineTune>(SCHEMA, key).unwrap();
    }
}

#[test]
fn finetune_changes_weights_learns_and_is_deterministic() {
    let _torch = testing::torch_lock();
    let model = small_cnn(1);
    let clean = testing::blocks(200, 7);
    let c = call(json!({"epochs": 3, "batch_size": 32, "lr": 0.05}), 3);
    let h = Finetune
        .defend(&c, &model, None, Some(&clean.dataset()))
        .expect("defend");
    let r = &h.report;
    assert_eq!(r["epochs"].as_array().unwrap().len(), 3);
    assert!(r["epochs"][0]["loss"].as_f64().unwrap().is_finite());
    let (b, a) = (
        r["clean_accuracy_before"].as_f64().unwrap(),
        r["clean_accuracy_after"].as_f64().unwrap(),
    );
    assert!(a > b && a > 0.5, "fine-tuning learns the blocks: {b} -> {a}");
    assert!(r["weight_change_l2"].as_f64().unwrap() > 0.0);
    assert!(h.dropped.is_empty());
    // Weights changed, the graph did not.
    let (w0, w1) = (weights(&model), weights(&h.model));
    assert_eq!(w0.len(), w1.len());
    assert!(w0.iter().zip(&w1).any(|(x, y)| x.size() == y.size() && !x.equal(y)));
    let m = Model::load(&h.model, None).unwrap();
    assert_eq!(m.metadata("audit.defense"), Some("finetune"));
    // The same seed gives the same model.
    let again = Finetune
        .defend(&c, &model, None, Some(&clean.dataset()))
        .expect("defend");
    assert_eq!(again.model, h.model);
}

#[test]
fn adam_frozen_bn_and_constant_schedule_run() {
    let _torch = testing::torch_lock();
    let model = small_cnn(2);
    let clean = testing::blocks(40, 8);
    let c = call(
        json!({"epochs": 1, "batch_size": 20, "optimizer": "adam", "lr": 0.001, "freeze_bn": true, "schedule": "constant"}),
        0,
    );
    let h = Finetune
        .defend(&c, &model, None, Some(&clean.dataset()))
        .expect("defend");
    assert_eq!(h.report["fine_tune"]["optimizer"], "adam");
    // Frozen BN: running statistics are unchanged.
    let stats = |bytes: &[u8]| -> Vec<Tensor> {
        let m = Model::load(bytes, None).unwrap();
        m.params
            .iter()
            .filter(|p| p.role == audit_nn::ParamRole::BnStat)
            .map(|p| p.tensor.copy())
            .collect()
    };
    let (s0, s1) = (stats(&model), stats(&h.model));
    assert!(!s0.is_empty());
    assert!(s0.iter().zip(&s1).all(|(a, b)| a.equal(b)));
}

#[test]
fn zero_epochs_returns_the_same_weights() {
    let _torch = testing::torch_lock();
    let model = small_cnn(3);
    let clean = testing::blocks(20, 9);
    let h = Finetune
        .defend(&call(json!({"epochs": 0}), 0), &model, None, Some(&clean.dataset()))
        .expect("defend");
    let (w0, w1) = (weights(&model), weights(&h.model));
    assert!(w0.iter().zip(&w1).all(|(a, b)| a.equal(b)));
    assert_eq!(h.report["clean_accuracy_before"], h.report["clean_accuracy_after"]);
}

#[test]
fn missing_or_mismatched_clean_data_is_invalid() {
    let _torch = testing::torch_lock();
    let model = small_cnn(4);
    let c = call(json!({"epochs": 1}), 0);
    let e = Finetune.defend(&c, &model, None, None).unwrap_err();
    assert_eq!(e.status, Status::InvalidInput);
    assert!(e.message.contains("clean subset"), "{}", e.message);
    let empty = TestData::u8([0, 1, 28, 28], vec![], vec![], 10);
    let e = Finetune.defend(&c, &model, None, Some(&empty.dataset())).unwrap_err();
    assert_eq!(e.status, Status::InvalidInput);
    // Images of the wrong size for the model.
    let wrong = TestData::random_u8([4, 3, 8, 8], 10, 1);
    let e = Finetune.defend(&c, &model, None, Some(&wrong.dataset())).unwrap_err();
    assert_eq!(e.status, Status::InvalidInput, "{}", e.message);
    // More classes than the model has outputs.
    let five = zoo::to_bytes(&zoo::build(Arch::SmallCnn, [1, 28, 28], 5, 0).unwrap());
    let ten = testing::blocks(20, 1);
    let e = Finetune.defend(&c, &five, None, Some(&ten.dataset())).unwrap_err();
    assert_eq!(e.status, Status::InvalidInput);
    assert!(e.message.contains("only 5 outputs"), "{}", e.message);
}

#[test]
fn cancellation_is_reported() {
    let _torch = testing::torch_lock();
    let c = testing::cancelled_call(testing::params(SCHEMA, json!({"epochs": 2})));
    let clean = testing::blocks(20, 2);
    let e = Finetune
        .defend(&c, &small_cnn(5), None, Some(&clean.dataset()))
        .unwrap_err();
    assert_eq!(e.status, Status::Cancelled);
}
