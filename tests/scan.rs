//! `audit scan` through the binary and the real MM-BD plugin (and the sample-level SS and AC on a
//! training set): verdict and exit code agree, the reports are written in every format, bad input
//! is refused with exit 2 naming the flag or parameter, and nothing existing is overwritten
//! without --force. (Whether MM-BD is right on trained models is measured in the README's
//! Results, not asserted here.)

use audit_tests::{audit_in, zoo_small_cnn};

#[test]
fn scan_gives_a_verdict_its_exit_code_and_reports() {
    let dir = tempfile::tempdir().unwrap();
    let model = zoo_small_cnn(dir.path());
    let m = model.to_str().unwrap();
    let run = audit_in(
        dir.path(),
        &[
            "scan", m, "--param", "steps=20", "--param", "images=4", "--json", "--report", "r.html", "--report",
            "r.md", "--report", "r.json",
        ],
    );
    assert!(run.code == 0 || run.code == 3, "exit {}: {}", run.code, run.stderr);
    let doc = run.json();
    assert_eq!(doc["command"], "scan");
    assert_eq!(
        doc["flagged"].as_bool().unwrap(),
        run.code == 3,
        "exit code follows the verdict"
    );
    let f = &doc["findings"][0];
    assert_eq!(
        (f["detector"].as_str(), f["status"].as_str(), f["level"].as_str()),
        (Some("mmbd"), Some("ok"), Some("model"))
    );
    assert_eq!(f["report"]["statistics"].as_array().unwrap().len(), 10);
    let p = f["score"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&p), "p-value {p}");
    assert_eq!(f["params"]["steps"], 20, "the parameter reached the plugin");
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("r.json")).unwrap()).unwrap();
    assert_eq!(saved, doc);
    let html = std::fs::read_to_string(dir.path().join("r.html")).unwrap();
    assert!(html.contains("audit scan report") && html.contains("mmbd") && !html.contains("<script"));
    let md = std::fs::read_to_string(dir.path().join("r.md")).unwrap();
    assert!(md.contains("| mmbd | model |"), "{md}");

    // An existing report is not replaced without --force, and the scan does not start.
    let before = std::fs::read(dir.path().join("r.md")).unwrap();
    let again = audit_in(dir.path(), &["scan", m, "--report", "r.md"]).expect_code(2);
    assert!(again.stderr.contains("r.md"), "{}", again.stderr);
    assert_eq!(std::fs::read(dir.path().join("r.md")).unwrap(), before);
}

#[test]
fn scan_refuses_bad_input_with_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let model = zoo_small_cnn(dir.path());
    let m = model.to_str().unwrap();
    for (args, says) in [
        (vec!["--detector", "nope"], "no plugin named `nope`"),
        (vec!["--detector", "none"], "is a defense plugin, not a detector"),
        (vec!["--param", "other:steps=3"], "no detector `other`"),
        (vec!["--param", "steps=-1"], "steps"),
        (vec!["--param", "input=1x28"], "parameter `input`"),
        (vec!["--report", "x.pdf"], "x.pdf"),
    ] {
        let mut a = vec!["scan", m];
        a.extend(&args);
        let r = audit_in(dir.path(), &a).expect_code(2);
        assert!(r.stderr.contains(says), "{args:?}: {}", r.stderr);
    }
    let r = audit_in(dir.path(), &["scan", "missing.onnx"]).expect_code(2);
    assert!(r.stderr.contains("missing.onnx"), "{}", r.stderr);
}

/// The sample-level detectors (Spectral Signatures, Activation Clustering) through the binary on
/// a training set: each gives a verdict whose exit code agrees, at level "sample", and names
/// suspicious training samples exactly when it flags the model (none when it does not: missed
/// poisoned samples are misses, not false positives).
#[test]
fn sample_level_detectors_scan_the_training_set() {
    let dir = tempfile::tempdir().unwrap();
    let model = zoo_small_cnn(dir.path());
    let m = model.to_str().unwrap();
    for detector in ["ss", "ac"] {
        let run = audit_in(
            dir.path(),
            &[
                "scan",
                m,
                "--data",
                "synthetic",
                "--limit",
                "1000",
                "--detector",
                detector,
                "--json",
            ],
        );
        assert!(
            run.code == 0 || run.code == 3,
            "{detector}: exit {}: {}",
            run.code,
            run.stderr
        );
        let doc = run.json();
        assert_eq!(
            doc["flagged"].as_bool().unwrap(),
            run.code == 3,
            "{detector}: exit code follows the verdict"
        );
        let f = &doc["findings"][0];
        assert_eq!(
            (f["detector"].as_str(), f["status"].as_str(), f["level"].as_str()),
            (Some(detector), Some("ok"), Some("sample")),
            "{f}"
        );
        let backdoored = f["backdoored"].as_bool().unwrap();
        let n = f["n_suspicious"].as_u64().unwrap();
        assert_eq!(
            backdoored,
            n > 0,
            "{detector}: suspicious samples only when flagged: {f}"
        );
        assert_eq!(f["report"]["training_samples"], 1000, "--limit reached the plugin");
        assert_eq!(f["report"]["per_class"].as_array().unwrap().len(), 10);
        assert!(f["summary"].as_str().is_some_and(|s| !s.is_empty()), "{f}");
    }
    // Without --data they are refused by name.
    let r = audit_in(dir.path(), &["scan", m, "--detector", "ss"]).expect_code(2);
    assert!(r.stderr.contains("needs data"), "{}", r.stderr);
}

/// STRIP judges the training set's inputs (level `input`); its verdict and the exit code agree.
#[test]
fn strip_judges_the_training_inputs() {
    let dir = tempfile::tempdir().unwrap();
    let model = zoo_small_cnn(dir.path());
    let m = model.to_str().unwrap();
    let run = audit_in(
        dir.path(),
        &[
            "scan",
            m,
            "--data",
            "synthetic",
            "--limit",
            "1000",
            "--detector",
            "strip",
            "--param",
            "overlays=10",
            "--json",
        ],
    );
    assert!(run.code == 0 || run.code == 3, "exit {}: {}", run.code, run.stderr);
    let doc = run.json();
    assert_eq!(
        doc["flagged"].as_bool().unwrap(),
        run.code == 3,
        "exit code follows the verdict"
    );
    let f = &doc["findings"][0];
    assert_eq!(
        (f["detector"].as_str(), f["status"].as_str(), f["level"].as_str()),
        (Some("strip"), Some("ok"), Some("input")),
        "{f}"
    );
    assert_eq!(f["backdoored"].as_bool().unwrap(), run.code == 3, "{f}");
    assert_eq!(f["report"]["n_judged"], 1000, "--limit reached the plugin");
    assert_eq!(f["report"]["overlays"], 10, "the parameter reached the plugin");
    assert_eq!(f["n_suspicious"], f["report"]["n_flagged"], "{f}");
    assert_eq!(
        f["suspicious"].as_array().map_or(0, Vec::len) as u64,
        f["n_suspicious"].as_u64().unwrap(),
        "the indices are in the document"
    );
    assert!(f["summary"].as_str().is_some_and(|s| !s.is_empty()), "{f}");
}

/// `--eval-attack`: STRIP judges held-out clean test images and the same images triggered, and
/// the finding carries its false rejection and false acceptance rates; misuse is refused.
#[test]
fn strip_reports_far_and_frr_on_triggered_test_inputs() {
    let dir = tempfile::tempdir().unwrap();
    let model = zoo_small_cnn(dir.path());
    let m = model.to_str().unwrap();
    let data = audit_tests::data();
    let r = audit_in(
        dir.path(),
        &["scan", m, "--detector", "strip", "--eval-attack", "badnets"],
    )
    .expect_code(2);
    assert!(r.stderr.contains("--data"), "{}", r.stderr);
    let r = audit_in(
        dir.path(),
        &[
            "scan",
            m,
            "--data",
            data,
            "--detector",
            "strip",
            "--eval-attack",
            "finetune",
        ],
    )
    .expect_code(2);
    assert!(r.stderr.contains("not an attack"), "{}", r.stderr);
    let args = [
        "scan",
        m,
        "--data",
        data,
        "--limit",
        "100",
        "--detector",
        "strip",
        "--param",
        "overlays=10",
        "--eval-attack",
        "badnets",
        "--attack-param",
        "patch_size=4",
        "--eval-size",
        "100",
        "--json",
    ];
    let run = audit_in(dir.path(), &args);
    if data == "synthetic" {
        // 500 test images, all lent as the clean subset: nothing is held out.
        assert_eq!(run.code, 2, "{}", run.stderr);
        assert!(run.stderr.contains("held-out"), "{}", run.stderr);
        return;
    }
    assert!(run.code == 0 || run.code == 3, "exit {}: {}", run.code, run.stderr);
    let doc = run.json();
    let e = &doc["findings"][0]["input_eval"];
    assert_eq!(e["attack"], "badnets", "{e}");
    assert_eq!(e["params"]["patch_size"], 4, "--attack-param reached the attack");
    assert_eq!(e["n_clean"], 100);
    let (n_t, f_c, f_t) = (
        e["n_triggered"].as_u64().unwrap(),
        e["flagged_clean"].as_u64().unwrap(),
        e["flagged_triggered"].as_u64().unwrap(),
    );
    assert!(n_t > 50 && n_t <= 100, "target-class images are left out: {e}");
    assert!((e["frr"].as_f64().unwrap() - f_c as f64 / 100.0).abs() < 1e-12, "{e}");
    assert!(
        (e["far"].as_f64().unwrap() - (n_t - f_t) as f64 / n_t as f64).abs() < 1e-12,
        "{e}"
    );
    let table = audit_in(dir.path(), &args[..args.len() - 1]);
    assert!(
        table.stdout.contains("FRR") && table.stdout.contains("FAR"),
        "{}",
        table.stdout
    );
}
