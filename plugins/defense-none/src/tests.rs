//! Plugin-level tests of `defend`: a zoo small CNN trained inside the defense (`E1`) on a
//! patch-poisoned set of block images, then hardened with the default and with the paper's preset.
use audit_nn::zoo::{self, Arch};
use audit_sdk::schema::{check_enum, check_refused, Schema};
use audit_sdk::testing::{self, TestData};
use audit_sdk::{Call, Hardened, Status};
use serde_json::{json, Value};

use super::*;

/// A zoo small CNN for 1x28x28 inputs and 10 classes.
fn small_cnn(seed: u64) -> Vec<u8> {
    zoo::to_bytes(&zoo::build(Arch::SmallCnn, [1, 28, 28], 10, seed).expect("zoo model"))
}

fn call(overrides: Value, seed: u64) -> Call<'static> {
    testing::call(testing::params(SCHEMA, overrides), seed)
}

/// 600 block images (class = the block's position); 30 samples spread over classes 1-9 get a
/// white 3x3 patch in the bottom-right corner and label 0. Returns the set and the poisoned indices.
fn poisoned_blocks() -> (TestData, Vec<i64>) {
    let clean = testing::blocks(600, 5);
    let view = clean.dataset();
    let mut pixels = view.images.as_u8().expect("u8 blocks").to_vec();
    let mut labels = view.labels.to_vec();
    let poisoned: Vec<i64> = (0..600i64).filter(|i| i % 10 != 0).step_by(17).take(30).collect();
    for &i in &poisoned {
        let img = &mut pixels[i as usize * 784..(i as usize + 1) * 784];
        for r in 24..27 {
            for c in 24..27 {
                img[r * 28 + c] = 255;
            }
        }
        labels[i as usize] = 0;
    }
    (TestData::u8([600, 1, 28, 28], pixels, labels, 10), poisoned)
}

/// Small but complete: the backdoor is trained in (E1); the probes and the detector on small
/// subsets, with the epochs a probe needs to tell the blocks apart from 400 images.
fn small_run(extra: Value) -> Value {
    let mut p = json!({
        "E1": 4, "e1_lr": 0.05, "E2": 2, "batch_size": 32,
        "class_probe_epochs": 3, "class_probe_samples": 400, "trigger_negatives": 200, "trigger_epochs": 4,
    });
    p.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    p
}

fn harden(overrides: Value, data: &TestData) -> Hardened {
    NoneDefense
        .defend(&call(overrides, 7), &small_cnn(3), Some(&data.dataset()), None)
        .expect("defend")
}

fn recall(dropped: &[i64], poisoned: &[i64]) -> f64 {
    poisoned.iter().filter(|i| dropped.binary_search(i).is_ok()).count() as f64 / poisoned.len() as f64
}

#[test]
fn schema_is_valid_and_defaults_parse() {
    Schema::parse(SCHEMA).expect("valid schema");
    let info = NoneDefense::info();
    assert_eq!(info.name, "none");
    assert_eq!(
        info.capabilities,
        abi::AUDIT_CAP_NEEDS_MODEL | abi::AUDIT_CAP_NEEDS_TRAINING_DATA | abi::AUDIT_CAP_USES_CLEAN_DATA
    );
    let p: Params = testing::params(SCHEMA, json!({})).parse().expect("defaults parse");
    assert_eq!(
        (
            p.preset,
            p.suspects,
            p.repair,
            p.paper_with_targets,
            p.paper_filter,
            p.layers
        ),
        (
            Preset::Default,
            Suspects::Both,
            Repair::Retrain,
            PaperWithTargets::None,
            PaperFilter::Novel,
            Layers::All
        )
    );
    assert_eq!((p.class_agreement, p.class_agreement_z), (0.6, 1.645));
    assert_eq!(
        (p.clean_label, p.clean_label_threshold),
        (CleanLabel::Scan, audit_plugin_common::scan::THRESHOLD)
    );
    let e = p.effective();
    assert_eq!(e.e2, 6, "E2 = 0: retrain's own default");
    let paper: Params = testing::params(SCHEMA, json!({"preset": "paper"})).parse().unwrap();
    let paper = paper.effective();
    assert_eq!(
        (paper.suspects, paper.repair, paper.e2),
        (Suspects::Paper, Repair::Finetune, 20)
    );
    assert_eq!(paper.clean_label, CleanLabel::Off, "the paper has no clean-label check");
}

#[test]
fn enum_parameters_match_the_schema_and_refuse_other_values() {
    check_enum::<Preset>(SCHEMA, "preset").unwrap();
    check_enum::<Suspects>(SCHEMA, "suspects").unwrap();
    check_enum::<Repair>(SCHEMA, "repair").unwrap();
    check_enum::<RetrainOptimizer>(SCHEMA, "retrain_optimizer").unwrap();
    check_enum::<Layers>(SCHEMA, "layers").unwrap();
    check_enum::<CleanLabel>(SCHEMA, "clean_label").unwrap();
    check_enum::<PaperWithTargets>(SCHEMA, "paper_with_targets").unwrap();
    check_enum::<PaperFilter>(SCHEMA, "paper_filter").unwrap();
    for key in [
        "preset",
        "suspects",
        "repair",
        "retrain_optimizer",
        "layers",
        "paper_with_targets",
        "paper_filter",
        "clean_label",
    ] {
        check_refused::<Params>(SCHEMA, key).unwrap();
    }
}

/// The default finds the patch-poisoned samples (class 0 detected, its side and the trigger
/// detector's finds dropped), reports every class's judgement, and is deterministic.
#[test]
fn default_defend_drops_the_poisoned_samples_and_is_deterministic() {
    let _torch = testing::torch_lock();
    let (data, poisoned) = poisoned_blocks();
    let h = harden(small_run(json!({})), &data);
    assert!(h.dropped.windows(2).all(|w| w[0] < w[1]), "sorted, unique");
    assert!(h.dropped.iter().all(|&i| (0..600).contains(&i)));
    let r = &h.report["rounds"][0];
    let split = r["class_split"].as_array().expect("class-wise report");
    assert_eq!(split.len(), 10, "every class judged");
    let accepted: Vec<i64> = split
        .iter()
        .filter(|c| c["accepted"] == json!(true))
        .map(|c| c["class"].as_i64().unwrap())
        .collect();
    assert_eq!(accepted, [0], "the target class is detected: {split:?}");
    assert!(r["paper_groups"].is_array());
    // The retrain runs cycles of E2 epochs until it fits the kept samples as well as the analysed
    // model did (at most retrain_cycles, 3): every cycle but the last fell short of that bar.
    let cycles = r["retrain_cycles"].as_array().expect("retrain cycles");
    assert!((1..=3).contains(&cycles.len()), "{cycles:?}");
    let fits: Vec<(f64, f64)> = cycles
        .iter()
        .map(|c| (c["fit"].as_f64().unwrap(), c["bar"].as_f64().unwrap()))
        .collect();
    assert!(fits[..fits.len() - 1].iter().all(|(fit, bar)| fit < bar), "{cycles:?}");
    assert!(cycles.len() == 3 || fits[fits.len() - 1].0 >= fits[0].1, "{cycles:?}");
    let epochs = h.report["epochs"].as_array().unwrap();
    let retrain_epochs = epochs
        .iter()
        .filter(|e| e["phase"].as_str().unwrap_or("").starts_with("retrain"))
        .count();
    assert_eq!(
        retrain_epochs,
        cycles.len() * cycles[0]["epochs"].as_u64().unwrap() as usize
    );
    let found = recall(&h.dropped, &poisoned);
    assert!(found >= 0.9, "recall {found}, dropped {}", h.dropped.len());
    assert!(h.dropped.len() <= 60, "{} dropped for 30 poisoned", h.dropped.len());
    let m = Model::load(&h.model, None).unwrap();
    assert_eq!(m.metadata("audit.defense"), Some("none"));
    // The same seed gives the same model and the same suspects.
    let again = harden(small_run(json!({})), &data);
    assert_eq!((again.model, again.dropped), (h.model, h.dropped));
}

/// 600 block images, and 30 of class 0's 60 carry a clean-label trigger (SIG's form: a vertical
/// sinusoid `40 sin(2 pi j 6 / 28)` added along the columns, label kept). Returns the set and the
/// triggered indices.
fn clean_label_blocks() -> (TestData, Vec<i64>) {
    let clean = testing::blocks(600, 5);
    let view = clean.dataset();
    let mut pixels = view.images.as_u8().expect("u8 blocks").to_vec();
    let labels = view.labels.to_vec();
    let triggered: Vec<i64> = (0..600i64).filter(|i| i % 10 == 0).step_by(2).collect();
    for &i in &triggered {
        let img = &mut pixels[i as usize * 784..(i as usize + 1) * 784];
        for (j, p) in img.iter_mut().enumerate() {
            let wave = 40.0 * (2.0 * std::f64::consts::PI * (j % 28) as f64 * 6.0 / 28.0).sin();
            *p = (*p as f64 + wave).clamp(0.0, 255.0) as u8;
        }
    }
    (TestData::u8([600, 1, 28, 28], pixels, labels, 10), triggered)
}

/// The clean-label check: the class-wise split's probe cannot see a clean-label poisoning (the
/// triggered images are genuine images of their class), SCAn with the lent clean set does; with
/// no clean set, or `clean_label=off`, the check is skipped and says so.
#[test]
fn the_clean_label_check_drops_triggered_images_of_their_own_class() {
    let _torch = testing::torch_lock();
    let (data, triggered) = clean_label_blocks();
    let clean = testing::blocks(300, 11);
    let run = |extra: Value, clean: Option<&TestData>| {
        let c = clean.map(TestData::dataset);
        NoneDefense
            .defend(
                &call(small_run(extra), 7),
                &small_cnn(3),
                Some(&data.dataset()),
                c.as_ref(),
            )
            .expect("defend")
    };
    let h = run(json!({}), Some(&clean));
    let check = &h.report["rounds"][0]["clean_label"];
    assert_eq!(check["classes"], json!([0]), "{check}");
    assert_eq!(check["clean_samples"], json!(300));
    let passes = check["passes"].as_array().expect("passes");
    assert!(!passes.is_empty() && passes.len() <= 3, "{check}");
    let found = recall(&h.dropped, &triggered);
    assert!(found >= 0.9, "recall {found}: {check}");
    let of_class_0 = h.dropped.iter().filter(|&&i| i % 10 == 0).count();
    assert!(
        of_class_0 <= 40,
        "{of_class_0} of class 0 dropped for 30 triggered: {check}"
    );
    let elsewhere = h.dropped.iter().filter(|&&i| i % 10 != 0).count();
    assert!(elsewhere <= 10, "{elsewhere} dropped outside the target class");
    // Without a clean set the check is skipped, named in the report; off: not run.
    let without = run(json!({}), None);
    let skipped = &without.report["rounds"][0]["clean_label"];
    assert!(
        skipped["skipped"].as_str().unwrap().contains("no clean subset"),
        "{skipped}"
    );
    let off = run(json!({"clean_label": "off"}), Some(&clean));
    assert!(off.report["rounds"][0]["clean_label"].is_null());
    // ... and the class-wise split alone does not find them: the check is what drops them.
    let alone = recall(&off.dropped, &triggered);
    assert!(alone <= 0.5, "recall {alone} without the check");
}

/// `paper_filter=novel` only returns the paper's suspects to the training: with the paper's split
/// kept beside the class-wise one (`paper_with_targets=unswept`), the filtered set is a subset of
/// the unfiltered one, and each class's verdict is reported.
#[test]
fn the_paper_filter_only_returns_suspects() {
    let _torch = testing::torch_lock();
    let (data, _) = poisoned_blocks();
    let kept = harden(
        small_run(json!({"paper_with_targets": "unswept", "paper_filter": "none"})),
        &data,
    );
    let judged = harden(
        small_run(json!({"paper_with_targets": "unswept", "paper_filter": "novel"})),
        &data,
    );
    assert!(judged.dropped.iter().all(|i| kept.dropped.binary_search(i).is_ok()));
    let groups = judged.report["rounds"][0]["paper_groups"].as_array().unwrap();
    for g in groups {
        assert!(g["kept"].as_i64().unwrap() <= g["suspects"].as_i64().unwrap(), "{g}");
    }
    assert!(kept.report["rounds"][0]["paper_groups"].as_array().unwrap().is_empty());
}

/// `preset=paper` is the paper's algorithm: no class-wise split, the fine-tuning repair.
#[test]
fn paper_preset_has_no_class_split() {
    let _torch = testing::torch_lock();
    let (data, _) = poisoned_blocks();
    let h = harden(json!({"preset": "paper", "E1": 2, "E2": 1, "batch_size": 32}), &data);
    assert_eq!(
        (&h.report["suspects"], &h.report["repair"]),
        (&json!("paper"), &json!("finetune"))
    );
    let r = &h.report["rounds"][0];
    assert!(r["class_split"].is_null() && r["paper_groups"].as_array().unwrap().is_empty());
    assert_eq!(r["n_suspects"].as_u64().unwrap() as usize, h.dropped.len());
}

#[test]
fn bad_input_is_invalid_and_cancellation_is_reported() {
    let _torch = testing::torch_lock();
    let model = small_cnn(4);
    let e = NoneDefense.defend(&call(json!({}), 0), &model, None, None).unwrap_err();
    assert_eq!(e.status, Status::InvalidInput);
    assert!(e.message.contains("training set"), "{}", e.message);
    let data = testing::blocks(40, 1);
    let e = NoneDefense
        .defend(
            &call(json!({"lamda_h": 0.2, "lamda_l": 0.3}), 0),
            &model,
            Some(&data.dataset()),
            None,
        )
        .unwrap_err();
    assert_eq!(e.status, Status::InvalidInput);
    assert!(e.message.contains("lamda_l"), "{}", e.message);
    let wrong = TestData::random_u8([8, 3, 8, 8], 10, 1);
    let e = NoneDefense
        .defend(&call(json!({}), 0), &model, Some(&wrong.dataset()), None)
        .unwrap_err();
    assert_eq!(e.status, Status::InvalidInput, "{}", e.message);
    let c = testing::cancelled_call(testing::params(SCHEMA, json!({})));
    let e = NoneDefense.defend(&c, &model, Some(&data.dataset()), None).unwrap_err();
    assert_eq!(e.status, Status::Cancelled);
}
