use std::sync::OnceLock;

use audit_nn::train::{Hooks, Preprocess, TrainConfig, Trainer};
use audit_nn::zoo::{self, Arch};
use audit_nn::Model;
use audit_sdk::schema::Schema;
use audit_sdk::testing::{self, TestData};
use audit_sdk::Status;

use audit_sdk::rng::Rng;

use super::*;

#[test]
fn schema_is_valid_and_defaults_parse() {
    Schema::parse(SCHEMA).expect("valid schema");
    let p: Params = testing::params(SCHEMA, json!({})).parse().expect("defaults parse");
    assert_eq!(
        (
            p.steps,
            p.samples_per_step,
            p.lr,
            p.init_cost,
            p.cost_multiplier,
            p.patience
        ),
        (300, 32, 0.1, 0.001, 1.5, 5)
    );
    assert_eq!((p.success, p.threshold), (0.99, 2.0));
    assert_eq!(
        NeuralCleanse::info().capabilities,
        audit_sdk::abi::AUDIT_CAP_NEEDS_MODEL | audit_sdk::abi::AUDIT_CAP_NEEDS_CLEAN_DATA
    );
}

/// The MAD outlier test on fixed numbers (worked by hand).
#[test]
fn anomaly_index_is_the_median_distance_in_mads_on_the_small_side() {
    let norms = [10.0, 20.0, 22.0, 24.0, 26.0, 28.0, 30.0, 21.0, 25.0, 27.0];
    // Sorted: 10 20 21 22 24 | 25 26 27 28 30 -> median 24.5; deviations sorted
    // 0.5 0.5 1.5 2.5 2.5 | 3.5 3.5 4.5 5.5 14.5 -> median 3.0; MAD 1.4826 * 3 = 4.4478.
    let a = anomaly(&norms).unwrap();
    assert_eq!(a.median, 24.5);
    assert!((a.mad - 4.4478).abs() < 1e-12, "{a:?}");
    assert!((a.index[0] - 14.5 / 4.4478).abs() < 1e-12, "{a:?}");
    assert!((a.index[1] - 4.5 / 4.4478).abs() < 1e-12);
    assert!(a.index[6] < 0.0, "the large side is negative");
    let all = [true; 10];
    assert_eq!(flagged(&a, &all, 2.0), [0]);
    assert_eq!(flagged(&a, &all, 3.3), Vec::<i64>::new(), "3.26 < 3.3");
    assert_eq!(flagged(&a, &all, 1.0), [0, 1], "index 1.0117 >= 1");
    // A class that never reached the success threshold is not flagged.
    let mut reached = all;
    reached[0] = false;
    assert_eq!(flagged(&a, &reached, 2.0), Vec::<i64>::new());
    // Odd count: the middle value.
    // No spread, too few classes, not finite: no test.
    assert_eq!(anomaly(&[5.0, 5.0, 5.0, 1.0]), None);
    assert_eq!(anomaly(&[1.0, 2.0]), None);
    assert_eq!(anomaly(&[1.0, f64::NAN, 2.0, 3.0]), None);
}

#[test]
fn the_batch_order_is_seeded_and_covers_every_image_before_repeating() {
    let o = batch_order(10, 4, 5, 7);
    assert_eq!(o.len(), 20);
    let mut first: Vec<i64> = o[..10].to_vec();
    first.sort();
    assert_eq!(first, (0..10).collect::<Vec<_>>());
    assert_eq!(o, batch_order(10, 4, 5, 7));
    assert_ne!(o, batch_order(10, 4, 5, 8));
}

/// `n` 1x28x28 images of 10 classes (class k: a bright 5x5 block at one of ten positions over
/// noise); `poison_percent`% of the images of classes 1..9 get a white 3x3 patch at rows and
/// columns 24..27 (clear of every block) and label `TARGET` (BadNets).
fn blocks(n: usize, poison_percent: usize, seed: u64) -> TestData {
    let mut rng = Rng::new(seed);
    let mut pixels = vec![0u8; n * 784];
    let mut labels: Vec<i64> = (0..n).map(|i| (i % 10) as i64).collect();
    for (i, y) in labels.iter_mut().enumerate() {
        let img = &mut pixels[i * 784..(i + 1) * 784];
        for p in img.iter_mut() {
            *p = rng.below(100) as u8;
        }
        let k = *y as usize;
        let (r0, c0) = (1 + 12 * (k / 5) + rng.below(3), 5 * (k % 5) + rng.below(3));
        for r in r0..r0 + 5 {
            for c in c0..c0 + 5 {
                img[r * 28 + c] = (140 + rng.below(100)) as u8;
            }
        }
        if *y != TARGET && rng.below(100) < poison_percent {
            for r in 24..27 {
                for c in 24..27 {
                    img[r * 28 + c] = 255;
                }
            }
            *y = TARGET;
        }
    }
    TestData::u8([n, 1, 28, 28], pixels, labels, 10)
}

/// The backdoor's target: class 5, whose mask is the largest on the clean model (class 0's is
/// the smallest there: a target 0 would be the smallest without any backdoor).
const TARGET: i64 = 5;

/// A zoo small CNN trained for 3 epochs on 1,000 block images, `poison_percent`% poisoned.
fn trained(poison_percent: usize) -> Vec<u8> {
    let mut m = Model::load(
        &zoo::to_bytes(&zoo::build(Arch::SmallCnn, [1, 28, 28], 10, 1).unwrap()),
        None,
    )
    .unwrap();
    m.to_device(tch::Device::Cpu);
    let set = blocks(1000, poison_percent, 11);
    let data = device_data(&set.dataset(), tch::Device::Cpu).unwrap();
    let cfg = TrainConfig {
        epochs: 3,
        batch_size: 32,
        lr: 0.05,
        seed: 3,
        ..TrainConfig::default()
    };
    let mut t = Trainer::new(&m, cfg).unwrap();
    for _ in 0..3 {
        t.epoch(&m, &data, &Preprocess::default(), &mut Hooks::none()).unwrap();
    }
    m.export(&[]).unwrap()
}

fn backdoored_model() -> &'static [u8] {
    static MODEL: OnceLock<Vec<u8>> = OnceLock::new();
    MODEL.get_or_init(|| trained(10))
}

/// The clean images the scans get (another seed than the training set's).
fn clean_set() -> TestData {
    blocks(200, 0, 12)
}

const QUICK: &str = r#"{"steps": 150, "samples_per_step": 16}"#;

fn scan(model: &[u8], overrides: Value) -> audit_sdk::Result<Verdict> {
    let params = testing::params(SCHEMA, overrides);
    let set = clean_set();
    let clean = set.dataset();
    NeuralCleanse.scan_with_clean(&testing::call(params, 0), model, None, Some(&clean))
}

fn quick() -> Value {
    serde_json::from_str(QUICK).unwrap()
}

fn norms(v: &Verdict) -> Vec<f64> {
    serde_json::from_value(v.details["l1_norms"].clone()).unwrap()
}

/// The backdoor's class (`TARGET`, the corner patch) is flagged and has by far the smallest
/// mask; its mask and trigger come back as PNG images; the same seed gives the same norms.
/// Measured at this scale (150 steps of 16 images) with seeds 0, 1, 2: the target was flagged
/// and the smallest every time (L1 6.1, 4.7, 5.5 against 12.7, 13.8, 16.0 for the next class),
/// but with seed 1 two clean classes (2 and 7, index 2.1 and 2.3) were flagged beside it. So
/// "only the target is flagged" is not asserted; "every other class's mask is at least 1.5 times
/// the target's" is (observed: at least 2.1 times).
#[test]
fn the_patch_target_of_a_backdoored_model_is_flagged() {
    let _g = testing::torch_lock();
    let model = backdoored_model();
    let v = scan(model, quick()).unwrap_or_else(|e| panic!("scan failed: {e:?}"));
    let l1 = norms(&v);
    assert!(
        v.backdoored && v.target_classes.contains(&TARGET),
        "{}",
        v.details["summary"]
    );
    let t = TARGET as usize;
    for (c, &n) in l1.iter().enumerate() {
        assert!(
            c == t || n >= 1.5 * l1[t],
            "class {c}: {n} against the target's {}: {l1:?}",
            l1[t]
        );
    }
    let pc = &v.details["per_class"][t];
    assert_eq!(pc["reached_success"], true);
    assert!(pc["success_rate"].as_f64().unwrap() > 0.9, "{pc}");
    assert!(pc["anomaly_index"].as_f64().unwrap() >= 2.0, "{pc}");
    assert_eq!(
        v.details["score"], pc["anomaly_index"],
        "the score is the smallest mask's index"
    );
    let images = v.details["images"].as_array().unwrap();
    assert_eq!(images.len(), 2 * v.target_classes.len());
    for im in images {
        use base64ct::Encoding;
        let bytes = base64ct::Base64::decode_vec(im["png_base64"].as_str().unwrap()).unwrap();
        let info = png::Decoder::new(std::io::Cursor::new(bytes)).read_info().unwrap();
        assert_eq!((info.info().width, info.info().height), (28, 28));
    }
    // Same seed, same norms; another seed, other norms (a short run).
    let short = |seed: u64| norms(&scan(model, json!({"steps": 10, "samples_per_step": 8, "seed": seed})).unwrap());
    assert_eq!(short(0), short(0));
    assert_ne!(short(0), short(1));
}

/// The same training without poisoning: no class is flagged (measured with seeds 0, 1, 2:
/// largest anomaly index 1.04, 1.40, 1.04).
#[test]
fn a_clean_model_is_not_flagged() {
    let _g = testing::torch_lock();
    let model = trained(0);
    let v = scan(&model, quick()).unwrap_or_else(|e| panic!("scan failed: {e:?}"));
    assert!(!v.backdoored, "{}", v.details["summary"]);
}

#[test]
fn bad_parameters_and_missing_data_are_refused_naming_them() {
    let e = Params::default_resolve(json!({"steps": 0}));
    assert!(e.contains("steps"), "{e}");
    let e = Params::default_resolve(json!({"success": 1.5}));
    assert!(e.contains("success"), "{e}");
    let model = zoo::to_bytes(&zoo::build(Arch::SmallCnn, [1, 28, 28], 10, 3).unwrap());
    let e = scan(&model, json!({"lr": 0.0})).unwrap_err();
    assert_eq!(e.status, Status::InvalidInput);
    assert!(e.to_string().contains("parameter `lr`"), "{e}");
    let params = testing::params(SCHEMA, json!({}));
    let e = NeuralCleanse.scan(&testing::call(params, 0), &model, None).unwrap_err();
    assert!(e.to_string().contains("clean subset"), "{e}");
    let e = scan(b"not onnx", json!({})).unwrap_err();
    assert_eq!(e.status, Status::InvalidInput, "{e}");
    let params = testing::params(SCHEMA, json!({}));
    let set = clean_set();
    let clean = set.dataset();
    let e = NeuralCleanse
        .scan_with_clean(&testing::cancelled_call(params), &model, None, Some(&clean))
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
