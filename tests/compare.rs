//! `audit compare` end to end on a Fashion-MNIST subset: a real BadNets model, every bundled
//! defense through its plugin (quick settings), one defense made to fail, the reports in every
//! format, and the HTML page rendered by headless Chromium with no network.

use std::path::Path;

use audit_tests::{audit, data, root};
use serde_json::Value;

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

#[test]
fn compare_runs_every_defense_and_writes_reports() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n).to_str().unwrap().to_string();
    audit(&[
        "attack",
        "badnets",
        "--data",
        data(),
        "--arch",
        "small-cnn",
        "--limit",
        "4000",
        "--epochs",
        "2",
        "--out",
        &p("bn.onnx"),
        "--poisoned-data",
        &p("bn.npz"),
    ])
    .expect_code(0);

    // Bad input is refused before anything runs, and nothing is written.
    let r = audit(&[
        "compare",
        &p("bn.onnx"),
        "--data",
        &p("bn.npz"),
        "--defenses",
        "none,finetune",
        "--param",
        "epochs=1",
        "--report",
        &p("x.html"),
    ])
    .expect_code(2);
    assert!(r.stderr.contains("NAME.KEY=VALUE"), "{}", r.stderr);
    let r = audit(&[
        "compare",
        &p("bn.onnx"),
        "--data",
        &p("bn.npz"),
        "--defenses",
        "none,badnets",
    ])
    .expect_code(2);
    assert!(r.stderr.contains("not a defense"), "{}", r.stderr);
    let r = audit(&[
        "compare",
        &p("bn.onnx"),
        "--data",
        &p("bn.npz"),
        "--defenses",
        "finetune",
        "--param",
        "finetune.epochz=1",
    ])
    .expect_code(2);
    assert!(r.stderr.contains("epochz"), "{}", r.stderr);
    assert!(!dir.path().join("x.html").exists());
    // The host gives each defense the data its capabilities name, or refuses and says which.
    let r = audit(&[
        "harden",
        &p("bn.onnx"),
        "--data",
        &p("bn.npz"),
        "--defense",
        "abl",
        "--limit",
        "0",
    ])
    .expect_code(2);
    assert!(r.stderr.contains("`abl` needs the training set"), "{}", r.stderr);
    let r = audit(&[
        "harden",
        &p("bn.onnx"),
        "--data",
        &p("bn.npz"),
        "--defense",
        "nad",
        "--clean-size",
        "0",
    ])
    .expect_code(2);
    assert!(r.stderr.contains("`nad` needs a clean subset"), "{}", r.stderr);
    // --verify's detectors are checked before anything runs: a defense is no detector, and a
    // parameter needs a detector to go to.
    for (extra, says) in [
        (
            vec!["--verify-detector", "finetune"],
            "is a defense plugin, not a detector",
        ),
        (vec!["--verify-param", "steps=3"], "--verify-param needs --verify"),
        (vec!["--verify", "--verify-param", "stepz=3"], "stepz"),
    ] {
        let (model, npz) = (p("bn.onnx"), p("bn.npz"));
        let mut args = vec!["harden", &model, "--data", &npz, "--defense", "finetune"];
        args.extend(&extra);
        let r = audit(&args).expect_code(2);
        assert!(r.stderr.contains(says), "{extra:?}: {}", r.stderr);
    }
    assert!(!dir.path().join("bn.hardened.onnx").exists());

    // Neural Cleanse's images as PNG files: one mask and one trigger per flagged class, the
    // same images the report carries.
    let r = audit(&[
        "scan",
        &p("bn.onnx"),
        "--data",
        &p("bn.npz"),
        "--detector",
        "nc",
        "--param",
        "steps=60",
        "--images",
        &p("masks"),
        "--json",
    ]);
    assert!(r.code == 0 || r.code == 3, "exit {}: {}", r.code, r.stderr);
    let finding = &r.json()["findings"][0];
    let flagged = finding["target_classes"].as_array().unwrap();
    assert_eq!(
        finding["report"]["images"].as_array().unwrap().len(),
        2 * flagged.len(),
        "{finding}"
    );
    let mut files: Vec<String> = std::fs::read_dir(p("masks"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    files.sort();
    let mut want: Vec<String> = flagged
        .iter()
        .flat_map(|t| {
            [
                format!("nc-class-{t}-mask.png"),
                format!("nc-class-{t}-trigger-pattern-x-mask.png"),
            ]
        })
        .collect();
    want.sort();
    assert_eq!(files, want, "{}", r.stderr);
    for f in &files {
        let bytes = std::fs::read(dir.path().join("masks").join(f)).unwrap();
        assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"), "{f} is a PNG");
    }
    if !files.is_empty() {
        // A folder with files in it is refused before the scan starts.
        let again = audit(&[
            "scan",
            &p("bn.onnx"),
            "--data",
            &p("bn.npz"),
            "--detector",
            "nc",
            "--images",
            &p("masks"),
        ])
        .expect_code(2);
        assert!(again.stderr.contains("not empty"), "{}", again.stderr);
    }

    // harden --verify: the same detectors on the model before and on the hardened one after,
    // Neural Cleanse lent clean test images; the exit code follows the verdict after.
    let r = audit(&[
        "harden",
        &p("bn.onnx"),
        "--data",
        &p("bn.npz"),
        "--defense",
        "finetune",
        "--param",
        "epochs=1",
        "--verify-detector",
        "mmbd",
        "--verify-detector",
        "nc",
        "--verify-param",
        "mmbd:steps=20",
        "--verify-param",
        "mmbd:images=4",
        "--verify-param",
        "nc:steps=10",
        "--report",
        &p("h.md"),
        "--json",
    ]);
    assert!(r.code == 0 || r.code == 3, "exit {}: {}", r.code, r.stderr);
    let outcome = r.json();
    for side in ["before", "after"] {
        let found = outcome["verify"][side].as_array().unwrap();
        let names: Vec<&str> = found.iter().map(|f| f["detector"].as_str().unwrap()).collect();
        assert_eq!(names, ["mmbd", "nc"], "{side}");
        assert!(found.iter().all(|f| f["status"] == "ok"), "{side}: {found:?}");
        assert_eq!(found[0]["params"]["steps"], 20);
        assert_eq!(found[1]["params"]["steps"], 10);
    }
    let flagged_after = outcome["verify"]["after"]
        .as_array()
        .unwrap()
        .iter()
        .any(|f| f["backdoored"] == true);
    assert_eq!(
        flagged_after,
        r.code == 3,
        "exit code follows the verdict after hardening"
    );
    assert!(r.stderr.contains("scan verdict before hardening: "), "{}", r.stderr);
    let md = std::fs::read_to_string(p("h.md")).unwrap();
    assert!(
        md.contains("| scan verdict |") && md.contains("Scan verdict (--verify)"),
        "{md}"
    );
    std::fs::remove_file(p("bn.hardened.onnx")).unwrap();

    // Every defense at a quick setting; NAD is pointed at a layer the model lacks, so it fails
    // and its row says why while the others still run.
    let r = audit(&[
        "compare",
        &p("bn.onnx"),
        "--data",
        &p("bn.npz"),
        "--defenses",
        "none,fine-pruning,abl,nad,finetune",
        "--param",
        "none.E2=2",
        "--param",
        "fine-pruning.epochs=2",
        "--param",
        "abl.isolation_epochs=2",
        "--param",
        "abl.train_epochs=2",
        "--param",
        "abl.unlearning_epochs=2",
        "--param",
        "nad.layers=no_such_value",
        "--param",
        "finetune.epochs=2",
        "--eval-attack",
        "badnets",
        "--clean-size",
        "500",
        "--test-limit",
        "3000",
        "--report",
        &p("r.json"),
        "--report",
        &p("r.md"),
        "--report",
        &p("r.html"),
        "--out-dir",
        &p("models"),
        "--verify",
        "--verify-param",
        "steps=20",
        "--verify-param",
        "images=4",
    ])
    .expect_code(1);
    eprintln!("{}", r.stdout);
    assert!(r.stderr.contains("1 of 5 defense(s) failed"), "{}", r.stderr);
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(p("r.json")).unwrap()).unwrap();
    assert_eq!(doc["schema_version"], 1);
    assert_eq!(doc["command"], "compare");
    assert_eq!(doc["data"]["n_eval"], 3000);
    assert_eq!(doc["data"]["n_clean"], 500);
    assert_eq!(doc["data"]["n_poisoned"], 200);
    assert_eq!(doc["data"]["fingerprint"].as_str().unwrap().len(), 64);
    assert_eq!(doc["model"]["sha256"].as_str().unwrap().len(), 64);
    assert_eq!(doc["eval_attack"]["name"], "badnets");
    let base = &doc["baseline"];
    assert!(f(&base["attack_success_rate"]) >= 0.8, "{base}");
    // compare scanned the model the defenses start from once, itself.
    assert_eq!(base["scan"]["detectors"][0]["status"], "ok", "{base}");
    assert_eq!(
        r.stderr.matches("with `mmbd`").count(),
        5,
        "the input once, and the 4 hardened models: {}",
        r.stderr
    );
    let rows = doc["rows"].as_array().unwrap();
    let names: Vec<&str> = rows.iter().map(|r| r["defense"].as_str().unwrap()).collect();
    assert_eq!(names, ["none", "fine-pruning", "abl", "nad", "finetune"]);
    for row in rows {
        let name = row["defense"].as_str().unwrap();
        if name == "nad" {
            assert_eq!(row["status"], "failed");
            assert!(row["error"].as_str().unwrap().contains("no_such_value"), "{row}");
            continue;
        }
        assert_eq!(row["status"], "ok", "{row}");
        for k in [
            "clean_accuracy",
            "attack_success_rate",
            "robust_accuracy",
            "der",
            "seconds",
        ] {
            let v = f(&row[k]);
            assert!(v.is_finite() && v >= 0.0, "{name}.{k} = {v}");
        }
        assert!(row["peak_rss_bytes"].as_u64().unwrap() > 10 << 20, "{row}");
        // DER from the documented formula, on the reported numbers.
        let der = ((f(&base["attack_success_rate"]) - f(&row["attack_success_rate"])).max(0.0)
            - (f(&base["clean_accuracy"]) - f(&row["clean_accuracy"])).max(0.0)
            + 1.0)
            / 2.0;
        assert!(
            (f(&row["der"]) - der).abs() < 1e-12,
            "{name}: DER {} vs {der}",
            row["der"]
        );
        assert_eq!(row["per_class_asr"].as_array().unwrap().len(), 10);
        assert!(Path::new(row["output"].as_str().unwrap()).is_file(), "{row}");
        // --verify: every hardened model got the data-free detector's verdict.
        assert_eq!(row["scan"]["detectors"][0]["detector"], "mmbd", "{row}");
        assert!(row["scan"]["flagged"].is_boolean(), "{row}");
        eprintln!(
            "{name}: ACC {:.4} ASR {:.4} DER {:.4} {:.1}s",
            f(&row["clean_accuracy"]),
            f(&row["attack_success_rate"]),
            f(&row["der"]),
            f(&row["seconds"])
        );
    }
    // Detect-and-drop defenses report their suspects against poison_idx.
    for name in ["none", "abl"] {
        let row = rows.iter().find(|r| r["defense"] == name).unwrap();
        assert!(
            row["recall"].as_f64().is_some() && row["precision"].as_f64().is_some(),
            "{row}"
        );
    }
    // NONE removes this backdoor; the best ASR is marked.
    let none = &rows[0];
    assert!(f(&none["attack_success_rate"]) <= 0.1, "{none}");
    assert!(!doc["best"]["attack_success_rate"].as_array().unwrap().is_empty());
    for name in ["clean_accuracy", "der", "seconds"] {
        assert!(doc["best"][name].is_array(), "best {name}");
    }

    let table = &r.stdout;
    assert!(
        table.contains("undefended") && table.contains("FAILED") && table.contains(" *"),
        "{table}"
    );
    let md = std::fs::read_to_string(p("r.md")).unwrap();
    assert!(md.contains("| nad | FAILED:") && md.contains("**"), "{md}");
    assert!(md.contains("| scan verdict |"), "{md}");

    // `audit report` re-renders the JSON identically.
    audit(&["report", &p("r.json"), "--out", &p("again.json")]).expect_code(0);
    let again: Value = serde_json::from_str(&std::fs::read_to_string(p("again.json")).unwrap()).unwrap();
    assert_eq!(again, doc);

    // The HTML page: self-contained, and Chromium renders it with no network.
    let html = std::fs::read_to_string(p("r.html")).unwrap();
    assert_eq!(html.matches("<svg").count(), 3, "three charts");
    for bad in ["<script", "<link", "src=", "url("] {
        assert!(!html.contains(bad), "{bad} in the page");
    }
    let png = dir.path().join("r.png");
    let out = std::process::Command::new("bash")
        .arg(root().join("scripts/screenshot-report"))
        .args([p("r.html").as_str(), png.to_str().unwrap(), "1280", "1600"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "screenshot failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bytes = std::fs::read(&png).unwrap();
    assert_eq!(&bytes[1..4], b"PNG");
    let (w, h) = (
        u32::from_be_bytes(bytes[16..20].try_into().unwrap()),
        u32::from_be_bytes(bytes[20..24].try_into().unwrap()),
    );
    assert_eq!((w, h), (1280, 1600));
    // A blank page compresses to a few kB; the table and charts do not.
    assert!(bytes.len() > 40_000, "screenshot is {} bytes: blank page?", bytes.len());
}
