//! The sample-level detectors' test kit (cargo feature `testing`, taken by their
//! dev-dependencies): a BadNets-poisoned version of the SDK's block images, a small CNN trained
//! on a set, and the precision and recall of flagged indices.

use audit_nn::tch::Device;
use audit_nn::train::{Hooks, Preprocess, TrainConfig, Trainer};
use audit_nn::zoo::{self, Arch};
use audit_nn::Model;
use audit_sdk::testing::{self, TestData};

use crate::device_data;

/// `audit_sdk::testing::blocks(n, seed)` (class k: a bright block at one of ten positions) with
/// the first `per_class` images of every class other than `target` poisoned as BadNets does: a
/// white 3x3 patch at rows and columns 24..27 (clear of every block) and the label `target`.
/// Returns the set and the poisoned indices (ascending).
pub fn poisoned_blocks(n: usize, per_class: usize, target: i64, seed: u64) -> (TestData, Vec<i64>) {
    let clean = testing::blocks(n, seed);
    let d = clean.dataset();
    let mut pixels = d.images.as_u8().expect("u8 blocks").to_vec();
    let mut labels = d.labels.to_vec();
    let mut taken = [0usize; 10];
    let mut poisoned = Vec::new();
    for (i, y) in labels.iter_mut().enumerate() {
        let c = *y as usize;
        if *y == target || taken[c] >= per_class {
            continue;
        }
        taken[c] += 1;
        let img = &mut pixels[i * 784..(i + 1) * 784];
        for r in 24..27 {
            for col in 24..27 {
                img[r * 28 + col] = 255;
            }
        }
        *y = target;
        poisoned.push(i as i64);
    }
    (TestData::u8([n, 1, 28, 28], pixels, labels, 10), poisoned)
}

/// A zoo small CNN (1x28x28, 10 classes) trained on `set` for `epochs` epochs on the CPU
/// (SGD, batch 32, lr 0.05), as ONNX bytes.
pub fn trained_small_cnn(set: &TestData, epochs: usize, seed: u64) -> Vec<u8> {
    let mut m = Model::load(
        &zoo::to_bytes(&zoo::build(Arch::SmallCnn, [1, 28, 28], 10, seed).expect("zoo model")),
        None,
    )
    .expect("zoo model loads");
    m.to_device(Device::Cpu);
    let data = device_data(&set.dataset(), Device::Cpu).expect("data on the device");
    let cfg = TrainConfig {
        epochs,
        batch_size: 32,
        lr: 0.05,
        seed,
        ..TrainConfig::default()
    };
    let mut t = Trainer::new(&m, cfg).expect("trainer");
    for _ in 0..epochs {
        t.epoch(&m, &data, &Preprocess::default(), &mut Hooks::none())
            .expect("epoch");
    }
    m.export(&[]).expect("export")
}

/// (precision, recall) of `flagged` against the truly poisoned `truth`. Nothing flagged:
/// precision 1 (no false positive) and recall 0 (every poisoned sample is a miss, a false
/// negative); no poisoned sample: recall 1.
pub fn precision_recall(flagged: &[i64], truth: &[i64]) -> (f64, f64) {
    let hits = flagged.iter().filter(|i| truth.contains(i)).count() as f64;
    let precision = if flagged.is_empty() {
        1.0
    } else {
        hits / flagged.len() as f64
    };
    let recall = if truth.is_empty() {
        1.0
    } else {
        hits / truth.len() as f64
    };
    (precision, recall)
}

/// The planted case the sample-level detectors' tests share: the backdoor's target class.
pub const PLANTED_TARGET: i64 = 5;

/// 2,000 block images (200 per class), 3 images of each other class poisoned into
/// [`PLANTED_TARGET`] (27 of its 227 samples, 11.9%): the set and its poisoned indices.
pub fn planted_set() -> (TestData, Vec<i64>) {
    poisoned_blocks(2000, 3, PLANTED_TARGET, 21)
}

/// A small CNN trained 3 epochs on [`planted_set`] (trained once per test binary).
pub fn planted_model() -> &'static [u8] {
    static MODEL: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    MODEL.get_or_init(|| trained_small_cnn(&planted_set().0, 3, 5))
}
