use std::sync::OnceLock;

use audit_nn::zoo::{self, Arch};
use audit_plugin_common::testing::{planted_model, poisoned_blocks, trained_small_cnn, PLANTED_TARGET};
use audit_sdk::schema::Schema;
use audit_sdk::testing::{self, TestData};
use audit_sdk::Status;

use super::*;

#[test]
fn schema_is_valid_and_defaults_parse() {
    Schema::parse(SCHEMA).expect("valid schema");
    let p: Params = testing::params(SCHEMA, json!({})).parse().expect("defaults parse");
    assert_eq!(
        (p.images_per_class, p.stim_steps, p.top_k, p.steps, p.batch_size),
        (20, 3, 10, 150, 80)
    );
    assert_eq!((p.stim_max, p.lr, p.bound, p.threshold), (1.0, 0.1, 0.06, 0.8));
    assert_eq!(
        bound_list(&p).unwrap(),
        [0.12, 0.10, 0.08, 0.06, 0.04, 0.02],
        "NONE's logged bounds"
    );
    assert_eq!(
        Abs::info().capabilities,
        audit_sdk::abi::AUDIT_CAP_NEEDS_MODEL | audit_sdk::abi::AUDIT_CAP_NEEDS_CLEAN_DATA
    );
}

/// The candidate rule on fixed numbers: at least 90% of the images agree, best margin first,
/// one neuron per label, at most `top_k`.
#[test]
fn candidates_need_agreement_and_take_one_neuron_per_label() {
    // Neurons 0..6 over 10 images (need 9 agreeing).
    let label = [3, 3, 5, 3, 7, 5];
    let agree = [9, 10, 10, 8, 9, 9];
    let score = [0.5, 2.0, 1.0, 9.0, 0.1, 3.0];
    let c = pick(&label, &agree, &score, 10, 10);
    // Neuron 3 fails agreement (8 < 9); label 5: neuron 5 (3.0) beats neuron 2 (1.0); label 3:
    // neuron 1 (2.0) beats neuron 0 (0.5).
    let got: Vec<(i64, i64)> = c.iter().map(|c| (c.channel, c.label)).collect();
    assert_eq!(got, [(5, 5), (1, 3), (4, 7)]);
    assert_eq!(pick(&label, &agree, &score, 10, 2).len(), 2);
    // floor(0.9 * 7) = 6 images needed.
    assert_eq!(pick(&[1], &[6], &[0.0], 7, 5).len(), 1);
    assert!(pick(&[1], &[5], &[0.0], 7, 5).is_empty());
}

/// The stimulated batch: block (channel i, value j) has channel c0 + i set to value j
/// everywhere and every other channel untouched.
#[test]
fn stimulation_sets_one_channel_per_block() {
    let (n, ch) = (2, 4);
    let z = Tensor::arange(n * ch * 3, (Kind::Float, tch::Device::Cpu)).view([n, ch, 3]);
    let values = Tensor::from_slice(&[0.0f32, 10.0, 20.0]);
    let (c0, cc) = (1, 2);
    let out = stimulated(&z.repeat_along(cc * 3), c0, cc, &values, n).view([cc, 3, n, ch, 3]);
    for i in 0..cc {
        for j in 0..3 {
            let block = out.get(i).get(j);
            for c in 0..ch {
                let got = block.select(1, c);
                if c == c0 + i {
                    assert!(got.eq(10.0 * j as f64).all().int64_value(&[]) == 1, "channel {c}");
                } else {
                    assert!(got.equal(&z.select(1, c)), "channel {c} untouched");
                }
            }
        }
    }
}

#[test]
fn the_default_site_is_the_last_conv_and_residual_skips_are_detected() {
    let m = Model::load(
        &zoo::to_bytes(&zoo::build(Arch::SmallCnn, [1, 28, 28], 10, 1).unwrap()),
        None,
    )
    .unwrap();
    let s = choose_site(&m, "").unwrap();
    assert_eq!(s.node, "conv2");
    assert!(s.cut, "a plain CNN reads its input only through conv2");
    // The value is the activation's input (after bn2), not the conv's raw output.
    let conv2 = m.layers().into_iter().find(|l| l.node == "conv2").unwrap();
    assert_ne!(s.value, conv2.value);
    let g = m.graph();
    assert_eq!(g.node(g.consumers(s.value)[0].0).class, audit_nn::OpClass::Activation);
    let e = choose_site(&m, "nope").unwrap_err().to_string();
    assert!(e.contains("parameter `layer`") && e.contains("conv1"), "{e}");
    let e = choose_site(&m, "fc2").unwrap_err().to_string();
    assert!(e.contains("parameter `layer`") && e.contains("logits"), "{e}");
    assert_eq!(choose_site(&m, "fc1").unwrap().node, "fc1");
    // Inside a ResNet the skip path reads the block's input around the conv.
    let r = Model::load(
        &zoo::to_bytes(&zoo::build(Arch::Resnet18, [3, 8, 8], 10, 1).unwrap()),
        None,
    )
    .unwrap();
    let s = choose_site(&r, "").unwrap();
    assert!(!s.cut, "{s:?}");
}

/// Clean block images for the scans (another seed than the training sets').
fn clean_set() -> TestData {
    testing::blocks(300, 99)
}

/// The same training as the planted model, without poisoning.
fn clean_model() -> &'static [u8] {
    static MODEL: OnceLock<Vec<u8>> = OnceLock::new();
    MODEL.get_or_init(|| trained_small_cnn(&poisoned_blocks(2000, 0, PLANTED_TARGET, 21).0, 3, 5))
}

fn quick() -> Value {
    json!({"images_per_class": 5, "top_k": 4, "steps": 60, "batch_size": 32, "bounds": "0.06,0.02"})
}

fn scan(model: &[u8], overrides: Value) -> audit_sdk::Result<Verdict> {
    let params = testing::params(SCHEMA, overrides);
    let set = clean_set();
    let clean = set.dataset();
    Abs.scan_with_clean(&testing::call(params, 0), model, None, Some(&clean))
}

fn by_bound(v: &Verdict) -> Vec<(f64, f64)> {
    v.details["reasr_by_bound"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["bound"].as_f64().unwrap(), e["max_reasr"].as_f64().unwrap()))
        .collect()
}

/// The planted BadNets model (white 3x3 corner patch, target 5) is flagged with its target and
/// its trigger comes back as PNG images; the clean model trained the same way has a lower
/// REASR at the verdict bound. Both runs and the ordering are printed and asserted. Measured
/// (seed 0, 60 steps, 4 candidates): planted REASR 1.000 at 6% and 0.756 at 2% (one candidate
/// neuron, label 5); clean 0.111 at 6% and 0.000 at 2% (one candidate).
#[test]
fn a_planted_backdoor_has_a_higher_reasr_than_the_clean_model() {
    let _g = testing::torch_lock();
    let v = scan(planted_model(), quick()).unwrap_or_else(|e| panic!("scan failed: {e:?}"));
    eprintln!("planted: {} {:?}", v.details["summary"], by_bound(&v));
    let c = scan(clean_model(), quick()).unwrap_or_else(|e| panic!("scan failed: {e:?}"));
    eprintln!("clean: {} {:?}", c.details["summary"], by_bound(&c));
    let planted = v.details["score"].as_f64().unwrap();
    let clean = c.details["score"].as_f64().unwrap();
    assert!(
        v.backdoored && v.target_classes == [PLANTED_TARGET],
        "{}",
        v.details["summary"]
    );
    assert!(planted >= 0.8, "{planted}");
    assert!(clean < planted, "clean {clean} against planted {planted}");
    let best = &v.details["reasr_by_bound"][0]["best"];
    assert_eq!(best["label"], PLANTED_TARGET);
    assert!(
        best["mask_pixels"].as_i64().unwrap() <= (0.06f64 * 784.0) as i64,
        "{best}"
    );
    let images = v.details["images"].as_array().unwrap();
    assert_eq!(images.len(), 2);
    for im in images {
        use base64ct::Encoding;
        let bytes = base64ct::Base64::decode_vec(im["png_base64"].as_str().unwrap()).unwrap();
        let info = png::Decoder::new(std::io::Cursor::new(bytes)).read_info().unwrap();
        assert_eq!((info.info().width, info.info().height), (28, 28));
    }
    // Same seed, same numbers; a short run.
    let short = |seed: u64| {
        let v = scan(
            planted_model(),
            json!({"images_per_class": 3, "top_k": 2, "steps": 5, "batch_size": 8, "bounds": "0.06", "seed": seed}),
        )
        .unwrap();
        v.details["triggers"].clone()
    };
    assert_eq!(short(0), short(0));
}

#[test]
fn bad_parameters_and_missing_data_are_refused_naming_them() {
    let e = Params::default_resolve(json!({"steps": 0}));
    assert!(e.contains("steps"), "{e}");
    let e = Params::default_resolve(json!({"threshold": 1.5}));
    assert!(e.contains("threshold"), "{e}");
    let e = Params::default_resolve(json!({"stim_steps": 1}));
    assert!(e.contains("stim_steps"), "{e}");
    let model = zoo::to_bytes(&zoo::build(Arch::SmallCnn, [1, 28, 28], 10, 3).unwrap());
    for (over, name) in [
        (json!({"lr": 0.0}), "lr"),
        (json!({"stim_max": 0.0}), "stim_max"),
        (json!({"bounds": "0.1,abc"}), "bounds"),
        (json!({"bounds": "0.1,0"}), "bounds"),
        (json!({"bounds": "1.5"}), "bounds"),
        (json!({"bound": 0.0}), "bound"),
        (json!({"layer": "no-such-node"}), "layer"),
    ] {
        let e = scan(&model, over.clone()).unwrap_err();
        assert_eq!(e.status, Status::InvalidInput, "{over}: {e}");
        assert!(e.to_string().contains(&format!("parameter `{name}`")), "{over}: {e}");
    }
    let params = testing::params(SCHEMA, json!({}));
    let e = Abs.scan(&testing::call(params, 0), &model, None).unwrap_err();
    assert!(e.to_string().contains("clean subset"), "{e}");
    let e = scan(b"not onnx", json!({})).unwrap_err();
    assert_eq!(e.status, Status::InvalidInput, "{e}");
    let params = testing::params(SCHEMA, json!({}));
    let set = clean_set();
    let clean = set.dataset();
    let e = Abs
        .scan_with_clean(&testing::cancelled_call(params), &model, None, Some(&clean))
        .unwrap_err();
    assert_eq!(e.status, Status::Cancelled, "{e}");
}

#[test]
fn the_batch_order_is_seeded_and_covers_every_image_before_repeating() {
    let o = batch_order(10, 4, 5, 7);
    let mut first: Vec<i64> = o[..10].to_vec();
    first.sort();
    assert_eq!(first, (0..10).collect::<Vec<_>>());
    assert_eq!(o, batch_order(10, 4, 5, 7));
    assert_ne!(o, batch_order(10, 4, 5, 8));
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
