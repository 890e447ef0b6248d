use audit_nn::zoo::{self, Arch};
use audit_sdk::schema::{check_enum, check_refused, Schema};
use audit_sdk::testing::{self, TestData};
use audit_sdk::{Call, Status};
use serde_json::json;

use super::*;

/// A zoo small CNN for 1x28x28 inputs and 10 classes (conv1-bn1-relu1-pool, conv2-bn2-relu2-pool,
/// fc1, fc2).
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

/// The output value of the node named `node`.
fn output_of(model: &Model, node: &str) -> String {
    let graph = model.graph();
    let n = graph.node_named(node).unwrap_or_else(|| panic!("no node {node}"));
    graph.value_name(n.outputs[0]).to_string()
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-5 * (1.0 + a.abs().max(b.abs()))
}

#[test]
fn schema_is_valid_and_descriptor_matches() {
    let _torch = testing::torch_lock();
    Schema::parse(SCHEMA).expect("valid schema");
    let info = Nad::info();
    assert_eq!(info.name, "nad");
    assert_eq!(
        info.capabilities,
        abi::AUDIT_CAP_NEEDS_CLEAN_DATA | abi::AUDIT_CAP_NEEDS_MODEL
    );
    let p: Params = testing::params(SCHEMA, json!({})).parse().expect("defaults parse");
    assert_eq!(
        (p.teacher_epochs, p.epochs, p.lr, p.teacher_lr, p.batch_size),
        (10, 20, 0.1, 0.1, 64)
    );
    assert_eq!((p.weight_decay, p.momentum, p.nesterov, p.p), (1e-4, 0.9, true, 2.0));
    assert_eq!(
        (p.schedule, p.betas.as_str(), p.layers.as_str(), p.augment),
        (LrSchedule::Nad, "500,1000,1000", "", false)
    );
    assert_eq!(parse_betas(&p.betas).unwrap(), vec![500.0, 1000.0, 1000.0]);
}

#[test]
fn enum_parameters_match_the_schema_and_refuse_other_values() {
    check_enum::<LrSchedule>(SCHEMA, "schedule").unwrap();
    // The report spells it as the schema does.
    assert_eq!(json!(LrSchedule::Nad), json!("nad"));
    // A value the host would have refused, given straight to the plugin: an error, not a fallback.
    check_refused::<Params>(SCHEMA, "schedule").unwrap();
}

#[test]
fn attention_map_matches_hand_computation() {
    // Sample 0: channel 0 = [1, 2], channel 1 = [-3, 0] (one row, two columns); sample 1: zeros.
    let f = Tensor::from_slice(&[1.0f32, 2.0, -3.0, 0.0, 0.0, 0.0, 0.0, 0.0]).view([2, 2, 1, 2]);
    let got = |t: &Tensor| Vec::<f32>::try_from(t.reshape([-1])).unwrap();
    // p = 2: sum_c f^2 = [10, 4], norm sqrt(116).
    let n = 116f64.sqrt() + 1e-6;
    let want = [10.0 / n, 4.0 / n, 0.0, 0.0];
    let m = attention_map(&f, 2.0);
    assert_eq!(m.size(), vec![2, 2]);
    for (a, b) in got(&m).iter().zip(want) {
        assert!((*a as f64 - b).abs() < 1e-6, "{:?} vs {want:?}", got(&m));
    }
    // p = 1: sum_c |f| = [4, 2], norm sqrt(20).
    let n = 20f64.sqrt() + 1e-6;
    let m1 = got(&attention_map(&f, 1.0));
    assert!((m1[0] as f64 - 4.0 / n).abs() < 1e-6 && (m1[1] as f64 - 2.0 / n).abs() < 1e-6);
    // The same features: no loss. Maps [1, 0] vs [0, 1]: mean over positions of 1 and 1.
    let l = attention_loss(&f, &attention_map(&f, 2.0), 2.0);
    assert!(Vec::<f32>::try_from(l).unwrap().iter().all(|x| x.abs() < 1e-12));
    let s = Tensor::from_slice(&[1.0f32, 0.0]).view([1, 1, 1, 2]);
    let t = Tensor::from_slice(&[0.0f32, 1.0]).view([1, 2]);
    let l = attention_loss(&s, &t, 2.0).double_value(&[0]);
    assert!((l - 1.0).abs() < 1e-5, "{l}");
    // The gradient is finite, also through an all-zero map.
    let x = f.detach().set_requires_grad(true);
    let target = Tensor::from_slice(&[0.6f32, 0.8, 0.6, 0.8]).view([2, 2]);
    attention_loss(&x, &target, 2.0).sum(Kind::Float).backward();
    let g = Vec::<f32>::try_from(x.grad().reshape([-1])).unwrap();
    assert!(g.iter().all(|v| v.is_finite()), "{g:?}");
    assert!(g[..4].iter().any(|v| *v != 0.0));
}

#[test]
fn schedules_give_the_reported_rates() {
    let nad: Vec<f64> = (0..4).map(|e| lr_at(LrSchedule::Nad, 0.1, e, 20)).collect();
    assert_eq!(nad, vec![0.1, 0.1, 0.01, 0.01]);
    assert_eq!(lr_at(LrSchedule::Constant, 0.05, 7, 20), 0.05);
    assert!((lr_at(LrSchedule::Cosine, 0.1, 10, 20) - 0.05).abs() < 1e-12);
    assert_eq!(lr_at(LrSchedule::Cosine, 0.1, 0, 20), 0.1);
}

#[test]
fn default_layers_are_the_convs_after_their_activations() {
    let model = Model::load(&small_cnn(1), None).unwrap();
    let p: Params = testing::params(SCHEMA, json!({})).parse().unwrap();
    let mut notes = Vec::new();
    let layers = choose_layers(
        &model,
        &p,
        &Tensor::zeros([1, 1, 28, 28], (Kind::Float, tch::Device::Cpu)),
        &mut notes,
    )
    .expect("layers");
    let names: Vec<&str> = layers.iter().map(|l| l.value.as_str()).collect();
    assert_eq!(names, vec![output_of(&model, "relu1"), output_of(&model, "relu2")]);
    assert!(layers.iter().all(|l| l.taken == "post-activation"));
    assert_eq!(
        (layers[0].shape.clone(), layers[1].shape.clone()),
        (vec![32, 28, 28], vec![64, 14, 14])
    );
    // Two convs: the last two of the three betas, said in a note.
    assert_eq!((layers[0].beta, layers[1].beta), (1000.0, 1000.0));
    assert!(notes.iter().any(|n| n.contains("last 2")), "{notes:?}");
}

#[test]
fn nad_distils_and_returns_a_loadable_changed_model() {
    let _torch = testing::torch_lock();
    let model = small_cnn(1);
    let clean = testing::blocks(200, 7);
    let c = call(
        json!({"teacher_epochs": 2, "epochs": 3, "batch_size": 32, "lr": 0.02, "teacher_lr": 0.05, "schedule": "constant"}),
        3,
    );
    let h = Nad.defend(&c, &model, None, Some(&clean.dataset())).expect("defend");
    let r = &h.report;
    assert_eq!(r["defense"], "nad");
    assert_eq!(r["layers"].as_array().unwrap().len(), 2);
    assert_eq!(r["layers"][1]["channels"], 64);
    assert_eq!(r["teacher"]["epochs"].as_array().unwrap().len(), 2);
    let epochs = r["nad"]["epochs"].as_array().unwrap();
    assert_eq!(epochs.len(), 3);
    for e in epochs {
        let (loss, ce, at) = (
            e["loss"].as_f64().unwrap(),
            e["ce_loss"].as_f64().unwrap(),
            e["attention_loss"].as_f64().unwrap(),
        );
        assert!(ce.is_finite() && at.is_finite() && at >= 0.0, "{e}");
        assert!(close(loss, ce + at), "the loss is CE + attention: {e}");
        let per: f64 = e["attention_loss_per_layer"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .sum();
        assert!(close(per, at), "{e}");
    }
    let at = |i: usize| epochs[i]["attention_loss"].as_f64().unwrap();
    assert!(at(2) < at(0), "the attention loss falls: {} -> {}", at(0), at(2));
    let (gb, ga) = (
        r["attention_loss_eval_before"].as_f64().unwrap(),
        r["attention_loss_eval_after"].as_f64().unwrap(),
    );
    assert!(
        gb > 0.0 && ga < gb,
        "the student's attention approaches the teacher's: {gb} -> {ga}"
    );
    let (b, t, a) = (
        r["clean_accuracy_before"].as_f64().unwrap(),
        r["clean_accuracy_teacher"].as_f64().unwrap(),
        r["clean_accuracy_after"].as_f64().unwrap(),
    );
    assert!(
        t > b && a > b && a > 0.5,
        "both learn the blocks: {b} -> teacher {t}, student {a}"
    );
    assert!(h.dropped.is_empty());
    // Weights changed, the graph did not; the metadata says what was done.
    let (w0, w1) = (weights(&model), weights(&h.model));
    assert_eq!(w0.len(), w1.len());
    assert!(w0.iter().zip(&w1).any(|(x, y)| x.size() == y.size() && !x.equal(y)));
    let m = Model::load(&h.model, None).unwrap();
    assert_eq!(m.metadata("audit.defense"), Some("nad"));
    let params: Value = serde_json::from_str(m.metadata("audit.defense_params").unwrap()).unwrap();
    assert_eq!(params["epochs"], 3);
    // The same seed gives the same model.
    let again = Nad.defend(&c, &model, None, Some(&clean.dataset())).expect("defend");
    assert_eq!(again.model, h.model);
}

#[test]
fn given_layers_and_betas_are_checked() {
    let _torch = testing::torch_lock();
    let model = small_cnn(2);
    let m = Model::load(&model, None).unwrap();
    let relu2 = output_of(&m, "relu2");
    let clean = testing::blocks(20, 8);
    let quick = |extra: Value| {
        let mut o = json!({"teacher_epochs": 0, "epochs": 1, "batch_size": 10, "schedule": "cosine"});
        o.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        call(o, 0)
    };
    let h = Nad
        .defend(
            &quick(json!({"layers": relu2.clone(), "betas": "7"})),
            &model,
            None,
            Some(&clean.dataset()),
        )
        .expect("defend");
    assert_eq!(h.report["layers"][0]["value"], relu2.as_str());
    assert_eq!(h.report["layers"][0]["beta"], 7.0);
    assert_eq!(h.report["layers"][0]["taken"], "given");
    // An unknown name is named.
    let e = Nad
        .defend(
            &quick(json!({"layers": format!("{relu2}, no_such_value")})),
            &model,
            None,
            Some(&clean.dataset()),
        )
        .unwrap_err();
    assert_eq!(e.status, Status::InvalidInput);
    assert!(e.message.contains("no_such_value"), "{}", e.message);
    // Not a feature map: fc1's output is [N, 128].
    let fc1 = output_of(&m, "fc1");
    let e = Nad
        .defend(&quick(json!({"layers": fc1})), &model, None, Some(&clean.dataset()))
        .unwrap_err();
    assert_eq!(e.status, Status::InvalidInput);
    assert!(e.message.contains("[N, C, H, W]"), "{}", e.message);
    // Betas: wrong count for given layers, not a number.
    let e = Nad
        .defend(
            &quick(json!({"layers": relu2.clone(), "betas": "1,2"})),
            &model,
            None,
            Some(&clean.dataset()),
        )
        .unwrap_err();
    assert_eq!(e.status, Status::InvalidInput);
    assert!(e.message.contains("betas has 2 values"), "{}", e.message);
    let e = Nad
        .defend(
            &quick(json!({"betas": "500,lots"})),
            &model,
            None,
            Some(&clean.dataset()),
        )
        .unwrap_err();
    assert_eq!(e.status, Status::InvalidInput);
    assert!(e.message.contains("`lots`"), "{}", e.message);
}

#[test]
fn missing_or_mismatched_clean_data_is_invalid() {
    let _torch = testing::torch_lock();
    let model = small_cnn(4);
    let c = call(json!({"teacher_epochs": 1, "epochs": 1}), 0);
    let e = Nad.defend(&c, &model, None, None).unwrap_err();
    assert_eq!(e.status, Status::InvalidInput);
    assert!(e.message.contains("clean subset"), "{}", e.message);
    let empty = TestData::u8([0, 1, 28, 28], vec![], vec![], 10);
    let e = Nad.defend(&c, &model, None, Some(&empty.dataset())).unwrap_err();
    assert_eq!(e.status, Status::InvalidInput);
    let wrong = TestData::random_u8([4, 3, 8, 8], 10, 1);
    let e = Nad.defend(&c, &model, None, Some(&wrong.dataset())).unwrap_err();
    assert_eq!(e.status, Status::InvalidInput, "{}", e.message);
}

#[test]
fn a_model_without_convs_is_invalid() {
    let _torch = testing::torch_lock();
    // The small CNN's dense head fed by the image directly (Flatten, Gemm 784->128, Relu, Gemm).
    let mut proto = zoo::build(Arch::SmallCnn, [1, 28, 28], 10, 5).unwrap();
    let g = proto.graph.as_mut().unwrap();
    g.node
        .retain(|n| ["flatten", "fc1", "relu3", "fc2"].contains(&n.name()));
    g.node[0].input[0] = "input".into();
    let w = g.initializer.iter_mut().find(|t| t.name() == "fc1.weight").unwrap();
    w.dims = vec![128, 784];
    w.raw_data = Some(vec![0u8; 128 * 784 * 4]);
    let mlp = zoo::to_bytes(&proto);
    let clean = testing::blocks(20, 3);
    let e = Nad
        .defend(&call(json!({}), 0), &mlp, None, Some(&clean.dataset()))
        .unwrap_err();
    assert_eq!(e.status, Status::InvalidInput);
    assert!(e.message.contains("no Conv layer"), "{}", e.message);
}

#[test]
fn cancellation_is_reported() {
    let _torch = testing::torch_lock();
    let c = testing::cancelled_call(testing::params(SCHEMA, json!({"teacher_epochs": 2, "epochs": 2})));
    let clean = testing::blocks(20, 2);
    let e = Nad.defend(&c, &small_cnn(5), None, Some(&clean.dataset())).unwrap_err();
    assert_eq!(e.status, Status::Cancelled);
}
