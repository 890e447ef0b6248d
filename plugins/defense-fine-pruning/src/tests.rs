use audit_nn::train::Hooks;
use std::sync::OnceLock;

use audit_nn::zoo::{self, Arch};
use audit_sdk::rng::Rng;
use audit_sdk::schema::{check_enum, check_refused, Schema};
use audit_sdk::testing::{self, TestData};
use audit_sdk::{Call, Status};
use serde_json::json;

use super::*;
use audit_nn::train::TrainConfig;
use audit_plugin_common::FineTuneSchedule;

/// A zoo small CNN for 1x28x28 inputs and 10 classes, freshly initialised.
fn small_cnn(seed: u64) -> Vec<u8> {
    zoo::to_bytes(&zoo::build(Arch::SmallCnn, [1, 28, 28], 10, seed).expect("zoo model"))
}

/// The small CNN trained for a few epochs on the blocks (shared by the tests).
fn trained_cnn() -> &'static [u8] {
    static MODEL: OnceLock<Vec<u8>> = OnceLock::new();
    MODEL.get_or_init(|| {
        let mut m = Model::load(&small_cnn(1), None).unwrap();
        m.to_device(Device::Cpu);
        let set = testing::blocks(300, 11);
        let data = device_data(&set.dataset(), Device::Cpu).unwrap();
        let cfg = TrainConfig {
            epochs: 3,
            batch_size: 32,
            lr: 0.05,
            ..TrainConfig::default()
        };
        let mut t = Trainer::new(&m, cfg).unwrap();
        for _ in 0..3 {
            t.epoch(&m, &data, &Preprocess::default(), &mut Hooks::none()).unwrap();
        }
        m.export(&[]).unwrap()
    })
}

/// A two-layer perceptron (Flatten, Gemm 784->128, Relu, Gemm 128->10): the small CNN's dense
/// head fed by the image directly, so the model has no Conv.
fn mlp() -> Vec<u8> {
    let mut proto = zoo::build(Arch::SmallCnn, [1, 28, 28], 10, 5).unwrap();
    let g = proto.graph.as_mut().unwrap();
    g.node
        .retain(|n| ["flatten", "fc1", "relu3", "fc2"].contains(&n.name()));
    g.node[0].input[0] = "input".into();
    let used: HashSet<String> = g.node.iter().flat_map(|n| n.input.iter().cloned()).collect();
    g.initializer.retain(|t| used.contains(t.name()));
    let mut rng = Rng::new(3);
    let w = g.initializer.iter_mut().find(|t| t.name() == "fc1.weight").unwrap();
    w.dims = vec![128, 784];
    let bound = 1.0 / 28.0;
    w.raw_data = Some(
        (0..128 * 784)
            .flat_map(|_| (rng.uniform(-bound, bound) as f32).to_le_bytes())
            .collect(),
    );
    zoo::to_bytes(&proto)
}

fn call(overrides: Value, seed: u64) -> Call<'static> {
    testing::call(testing::params(SCHEMA, overrides), seed)
}

/// Every block of `slices` in `model` is exactly zero.
fn all_zero(model: &Model, slices: &[Slice]) -> bool {
    max_abs(model, slices) == 0.0
}

fn param<'m>(m: &'m Model, name: &str) -> &'m Tensor {
    &m.params.iter().find(|p| p.name == name).unwrap().tensor
}

fn usizes(v: &Value) -> Vec<usize> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as usize)
        .collect()
}

#[test]
fn schema_is_valid_and_descriptor_matches() {
    let _torch = testing::torch_lock();
    Schema::parse(SCHEMA).expect("valid schema");
    let info = FinePruning::info();
    assert_eq!(info.name, "fine-pruning");
    assert_eq!(
        info.capabilities,
        abi::AUDIT_CAP_NEEDS_CLEAN_DATA | abi::AUDIT_CAP_NEEDS_MODEL
    );
    let p: Params = testing::params(SCHEMA, json!({})).parse().expect("defaults parse");
    let tune: FineTune = testing::params(SCHEMA, json!({})).parse().expect("defaults parse");
    assert_eq!(
        (
            p.layer,
            p.activation,
            tune.schedule,
            p.step,
            p.acc_budget,
            tune.epochs,
            tune.lr,
            tune.momentum
        ),
        (
            LayerChoice::LastConv,
            Activation::Post,
            FineTuneSchedule::Cosine,
            0.01,
            0.1,
            10,
            0.01,
            0.9
        )
    );
}

#[test]
fn enum_parameters_match_the_schema_and_refuse_other_values() {
    check_enum::<LayerChoice>(SCHEMA, "layer").unwrap();
    check_enum::<Activation>(SCHEMA, "activation").unwrap();
    check_enum::<FineTuneSchedule>(SCHEMA, "schedule").unwrap();
    // A value the host would have refused, given straight to the plugin: an error, not a fallback.
    for key in ["layer", "activation"] {
        check_refused::<Params>(SCHEMA, key).unwrap();
    }
    check_refused::<FineTune>(SCHEMA, "schedule").unwrap();
}

#[test]
fn budget_rule_and_step_size() {
    // Relative drop strictly under the budget, or no drop at all.
    assert!(within_budget(0.9, 0.82, 0.1));
    assert!(!within_budget(0.9, 0.8, 0.1));
    assert!(!within_budget(1.0, 0.5, 0.5)); // exactly the budget: not under
    assert!(within_budget(0.9, 0.95, 0.1));
    assert!(within_budget(0.9, 0.9, 0.0));
    assert!(!within_budget(0.9, 0.899, 0.0));
    assert!(within_budget(0.0, 0.0, 0.1));
    // ceil(step * C), at least one.
    assert_eq!(step_size(64, 0.01), 1);
    assert_eq!(step_size(100, 0.01), 1);
    assert_eq!(step_size(300, 0.01), 3);
    assert_eq!(step_size(512, 0.01), 6);
    assert_eq!(step_size(10, 1.0), 10);
    assert_eq!(rank(&[0.5, 0.1, 0.5, -1.0]), vec![3, 1, 0, 2]);
}

#[test]
fn search_stops_at_the_first_step_over_budget_and_keeps_the_last_within() {
    // Accuracy 0.9 until 4 channels, 0.85 (5.6% drop) at 5-6, 0.80 (11% drop) from 7 on.
    let curve = |k: usize| {
        if k <= 4 {
            0.9
        } else if k <= 6 {
            0.85
        } else {
            0.8
        }
    };
    let mut asked = Vec::new();
    let (kept, steps) = search(20, 1, 0.9, 0.1, |k| {
        asked.push(k);
        Ok(curve(k))
    })
    .unwrap();
    assert_eq!(kept, 6);
    assert_eq!(asked, (1..=7).collect::<Vec<_>>(), "nothing is tried past the stop");
    assert_eq!(steps.len(), 7);
    assert!(steps[..6].iter().all(|s| s.accepted));
    assert_eq!(
        steps[6],
        Step {
            pruned: 7,
            accuracy: 0.8,
            accepted: false
        }
    );
    // A looser budget goes further; steps of 3.
    let (kept, steps) = search(20, 3, 0.9, 0.2, |k| Ok(curve(k))).unwrap();
    assert_eq!((kept, steps.len()), (18, 6));
    // The first step already over budget: nothing pruned.
    let (kept, steps) = search(20, 2, 0.9, 0.01, |k| Ok(curve(k + 4))).unwrap();
    assert_eq!((kept, steps.len()), (0, 1));
    // Never every channel, and errors (cancellation) propagate.
    let (kept, _) = search(10, 3, 0.5, 0.1, |_| Ok(0.5)).unwrap();
    assert_eq!(kept, 9);
    assert_eq!(search(1, 1, 0.5, 0.1, |_| Ok(0.5)).unwrap(), (0, vec![]));
    let e = search(10, 1, 0.5, 0.1, |_| Err(Error::cancelled())).unwrap_err();
    assert_eq!(e.status, Status::Cancelled);
}

#[test]
fn prunes_the_last_conv_and_masks_hold_through_fine_tuning() {
    let _torch = testing::torch_lock();
    let model = trained_cnn();
    let clean = testing::blocks(200, 12);
    let c = call(json!({"epochs": 2, "batch_size": 32}), 1);
    let h = FinePruning
        .defend(&c, model, None, Some(&clean.dataset()))
        .expect("defend");
    let r = &h.report;
    assert_eq!(r["layer"]["node"], "conv2");
    assert_eq!(r["layer"]["channels"], 64);
    assert_eq!(r["layer"]["ranked_value"], "relu2");
    assert_eq!(r["layer"]["ranked_on"], "post-activation");
    assert_eq!(r["step_channels"], 1);
    let base = r["clean_accuracy_before"].as_f64().unwrap();
    assert!(base > 0.8, "the shared model learned the blocks: {base}");
    let pruned = usizes(&r["pruned_channels"]);
    let n = pruned.len();
    assert!(n > 0 && n < 64, "pruned {n}");
    assert_eq!(r["n_pruned"], n);
    // The pruned channels are the least active ones.
    let ranking = usizes(&r["ranking"]);
    assert_eq!(pruned, ranking[..n]);
    let means: Vec<f64> = r["mean_activation"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    assert!(means.iter().all(|&m| m >= 0.0), "post-ReLU means are non-negative");
    // The kept count met the budget.
    let acc_pruned = r["clean_accuracy_pruned"].as_f64().unwrap();
    assert!(within_budget(base, acc_pruned, 0.1), "{base} -> {acc_pruned}");
    assert_eq!(r["pruned_weights_max_abs"], 0.0);

    // In the exported model the pruned blocks are exactly zero after fine-tuning: conv2's filters
    // and biases, bn2's scale and shift, fc1's input columns; the other channels are not.
    let out = Model::load(&h.model, None).unwrap();
    assert_eq!(out.metadata("audit.defense"), Some("fine-pruning"));
    let conv = out.layers().into_iter().find(|l| l.node == "conv2").unwrap();
    let x = Tensor::zeros([1, 1, 28, 28], (Kind::Float, Device::Cpu));
    let shapes = out.value_shapes(&x).unwrap();
    for c in 0..64i64 {
        let slices = out.neuron_slices(&conv, c, &shapes).unwrap();
        let params: Vec<&str> = slices.iter().map(|s| out.params[s.param].name.as_str()).collect();
        assert_eq!(
            params,
            ["conv2.weight", "conv2.bias", "bn2.weight", "bn2.bias", "fc1.weight"]
        );
        assert_eq!(all_zero(&out, &slices), pruned.contains(&(c as usize)), "channel {c}");
    }
    // Fine-tuning moved the remaining weights.
    let before = Model::load(model, None).unwrap();
    assert!(!param(&before, "fc2.weight").equal(param(&out, "fc2.weight")));
    assert_eq!(r["epochs"].as_array().unwrap().len(), 2);

    // Deterministic for a seed.
    let again = FinePruning
        .defend(&c, model, None, Some(&clean.dataset()))
        .expect("defend");
    assert_eq!(again.model, h.model);
}

#[test]
fn a_step_over_budget_is_undone() {
    let _torch = testing::torch_lock();
    // Zero budget: only steps that keep the clean accuracy are accepted. Large steps make the
    // breaking step likely; whatever happens, the kept model's accuracy is the kept step's.
    let model = trained_cnn();
    let clean = testing::blocks(100, 13);
    for (budget, step) in [(0.0, 0.25), (0.1, 0.2)] {
        let c = call(json!({"epochs": 0, "acc_budget": budget, "step": step}), 0);
        let h = FinePruning
            .defend(&c, model, None, Some(&clean.dataset()))
            .expect("defend");
        let r = &h.report;
        let base = r["clean_accuracy_before"].as_f64().unwrap();
        let steps = r["steps"].as_array().unwrap();
        let kept = r["n_pruned"].as_u64().unwrap();
        let acc_pruned = r["clean_accuracy_pruned"].as_f64().unwrap();
        let accepted: Vec<&Value> = steps.iter().filter(|s| s["accepted"] == true).collect();
        for s in &accepted {
            assert!(within_budget(base, s["clean_accuracy"].as_f64().unwrap(), budget));
        }
        match accepted.last() {
            Some(s) => {
                assert_eq!(s["pruned"], kept);
                assert_eq!(s["clean_accuracy"].as_f64().unwrap(), acc_pruned);
            }
            None => {
                assert_eq!(kept, 0);
                assert_eq!(acc_pruned, base);
            }
        }
        // Pruning stopped at the first rejected step, or ran out of channels.
        let last = steps.last().unwrap();
        if last["accepted"] == false {
            assert!(!within_budget(base, last["clean_accuracy"].as_f64().unwrap(), budget));
        } else {
            assert!(last["pruned"].as_u64().unwrap() + r["step_channels"].as_u64().unwrap() >= 64);
        }
        assert_eq!(
            steps.iter().filter(|s| s["accepted"] == false).count(),
            usize::from(last["accepted"] == false)
        );
        // With no fine-tuning the exported weights outside the pruned blocks are the input's.
        let out = Model::load(&h.model, None).unwrap();
        let before = Model::load(model, None).unwrap();
        assert!(param(&before, "conv1.weight").equal(param(&out, "conv1.weight")));
    }
}

#[test]
fn penultimate_prunes_the_final_layer_inputs() {
    let _torch = testing::torch_lock();
    let model = trained_cnn();
    let clean = testing::blocks(100, 14);
    let c = call(json!({"layer": "penultimate", "epochs": 1, "batch_size": 50}), 0);
    let h = FinePruning
        .defend(&c, model, None, Some(&clean.dataset()))
        .expect("defend");
    let r = &h.report;
    assert_eq!(r["layer"]["node"], "fc2");
    assert_eq!(r["layer"]["ranked_value"], "relu3");
    assert_eq!(r["layer"]["channels"], 128);
    let pruned = usizes(&r["pruned_channels"]);
    let out = Model::load(&h.model, None).unwrap();
    let w = param(&out, "fc2.weight"); // [10, 128]
    for f in 0..128i64 {
        let col_zero = w.narrow(1, f, 1).abs().max().double_value(&[]) == 0.0;
        assert_eq!(col_zero, pruned.contains(&(f as usize)), "feature {f}");
    }
}

#[test]
fn a_model_without_conv_needs_penultimate() {
    let _torch = testing::torch_lock();
    let model = mlp();
    let clean = testing::blocks(60, 15);
    let e = FinePruning
        .defend(&call(json!({"epochs": 0}), 0), &model, None, Some(&clean.dataset()))
        .unwrap_err();
    assert_eq!(e.status, Status::InvalidInput);
    assert!(
        e.message.contains("no Conv layer") && e.message.contains("penultimate"),
        "{}",
        e.message
    );
    let h = FinePruning
        .defend(
            &call(json!({"epochs": 1, "layer": "penultimate", "batch_size": 30}), 0),
            &model,
            None,
            Some(&clean.dataset()),
        )
        .expect("penultimate works without convs");
    assert_eq!(h.report["layer"]["node"], "fc2");
    assert_eq!(h.report["layer"]["channels"], 128);
}

#[test]
fn missing_clean_data_is_invalid() {
    let _torch = testing::torch_lock();
    let model = small_cnn(2);
    let c = call(json!({}), 0);
    let e = FinePruning.defend(&c, &model, None, None).unwrap_err();
    assert_eq!(e.status, Status::InvalidInput);
    assert!(e.message.contains("clean subset"), "{}", e.message);
    let empty = TestData::u8([0, 1, 28, 28], vec![], vec![], 10);
    let e = FinePruning
        .defend(&c, &model, None, Some(&empty.dataset()))
        .unwrap_err();
    assert_eq!(e.status, Status::InvalidInput);
}

#[test]
fn cancellation_is_reported() {
    let _torch = testing::torch_lock();
    let c = testing::cancelled_call(testing::params(SCHEMA, json!({"epochs": 1})));
    let clean = testing::blocks(20, 2);
    let e = FinePruning
        .defend(&c, &small_cnn(3), None, Some(&clean.dataset()))
        .unwrap_err();
    assert_eq!(e.status, Status::Cancelled);
}
