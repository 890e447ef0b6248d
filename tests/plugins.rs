//! The bundled plugins through the real binary: discovery, info, check, parameter validation,
//! poison/trigger runs on Fashion-MNIST, NPZ round trips, and output safety.

use std::process::Command;

use audit_tests::{audit, audit_in, data, python, sh};
use serde_json::Value;

const BUNDLED: [&str; 4] = ["badnets", "blend", "sig", "wanet"];

#[test]
fn list_json_shows_bundled_plugins_with_abi_version() {
    let v = audit(&["plugins", "list", "--json"]).expect_code(0).json();
    assert_eq!(v["schema_version"], 1);
    let plugins = v["plugins"].as_array().unwrap();
    for name in BUNDLED {
        let p = plugins
            .iter()
            .find(|p| p["name"] == name)
            .unwrap_or_else(|| panic!("{name} not listed: {v:#}"));
        assert_eq!(p["abi_version"], 1, "{p}");
        assert_eq!(p["kind"], "attack");
        assert_eq!(p["status"], "ok", "{p}");
        assert!(p["path"].as_str().unwrap().ends_with(".so"));
        assert!(!p["description"].as_str().unwrap().is_empty());
    }
}

#[test]
fn list_prints_a_table() {
    let r = audit(&["plugins", "list"]).expect_code(0);
    for col in [
        "name",
        "kind",
        "version",
        "ABI",
        "path",
        "description",
        "badnets",
        "wanet",
    ] {
        assert!(r.stdout.contains(col), "missing {col}:\n{}", r.stdout);
    }
}

#[test]
fn info_shows_parameters_with_types_and_defaults() {
    let r = audit(&["plugins", "info", "badnets"]).expect_code(0);
    for s in [
        "badnets",
        "attack",
        "ABI v1",
        "patch_size",
        "integer",
        "poison_rate",
        "target",
    ] {
        assert!(r.stdout.contains(s), "missing {s}:\n{}", r.stdout);
    }
    let v = audit(&["plugins", "info", "blend", "--json"]).expect_code(0).json();
    assert_eq!(v["params_schema"]["properties"]["alpha"]["default"], 0.2);
    assert!(v["build_info"].as_str().unwrap().contains("ABI v1"));
}

#[test]
fn check_loads_every_bundled_plugin() {
    let v = audit(&["plugins", "check", "--json"]).expect_code(0).json();
    assert_eq!(v["broken"], 0, "{v:#}");
    assert!(v["plugins"].as_array().unwrap().len() >= BUNDLED.len());
}

#[test]
fn unknown_plugin_is_a_usage_error_listing_what_exists() {
    let r = audit(&["plugins", "info", "nope"]).expect_code(2);
    assert!(
        r.stderr.contains("no plugin named `nope`") && r.stderr.contains("badnets"),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("hint:"), "{}", r.stderr);
}

#[test]
fn parameters_are_validated_before_the_plugin_runs() {
    let base = [
        "plugins",
        "run",
        "badnets",
        "--op",
        "trigger",
        "--data",
        "synthetic",
        "--limit",
        "8",
    ];
    let with = |extra: &[&str]| {
        let mut a: Vec<&str> = base.to_vec();
        a.extend_from_slice(extra);
        audit(&a)
    };
    let r = with(&["--param", "colour=3"]).expect_code(2);
    assert!(
        r.stderr.contains("unknown parameter `colour`") && r.stderr.contains("patch_size"),
        "{}",
        r.stderr
    );
    let r = with(&["--param", "poison_rate=2"]).expect_code(2);
    assert!(
        r.stderr.contains("`poison_rate`") && r.stderr.contains("maximum"),
        "{}",
        r.stderr
    );
    let r = with(&["--param", "patch_size=big"]).expect_code(2);
    assert!(
        r.stderr.contains("`patch_size`") && r.stderr.contains("not an integer"),
        "{}",
        r.stderr
    );
    let r = with(&["--param", "position=middle"]).expect_code(2);
    assert!(
        r.stderr.contains("`position`") && r.stderr.contains("not one of"),
        "{}",
        r.stderr
    );
    // A value only the plugin can judge (target beyond the 10 classes) comes back as input error.
    let r = with(&["--param", "target=12"]).expect_code(2);
    assert!(r.stderr.contains("target"), "{}", r.stderr);
}

fn poison(name: &str, seed: &str, extra: &[&str]) -> Value {
    let mut args = vec![
        "plugins",
        "run",
        name,
        "--op",
        "poison",
        "--data",
        data(),
        "--limit",
        "3000",
        "--seed",
        seed,
        "--json",
    ];
    args.extend_from_slice(extra);
    audit(&args).expect_code(0).json()
}

#[test]
fn every_bundled_attack_poisons_fashion_mnist_deterministically() {
    for name in BUNDLED {
        // SIG poisons only target-class images: at 5% of 3000 there are more candidates (282) than
        // picks (150), so the seed matters.
        let rate: &[&str] = if name == "sig" {
            &["--param", "poison_rate=0.05"]
        } else {
            &[]
        };
        let a = poison(name, "1", rate);
        let b = poison(name, "1", rate);
        let c = poison(name, "2", rate);
        let ix = a["indices"].as_array().unwrap();
        assert!(!ix.is_empty(), "{name}: nothing poisoned: {a:#}");
        assert_eq!(a["indices"], b["indices"], "{name}: same seed, different indices");
        assert_ne!(a["indices"], c["indices"], "{name}: seed ignored");
        let changed = a["changed_images"].as_u64().unwrap() as usize;
        assert!(
            changed >= ix.len() * 9 / 10,
            "{name}: {changed} images changed for {} poisoned",
            ix.len()
        );
        if name == "sig" {
            assert_eq!(a["changed_labels"], 0, "SIG is clean-label");
        } else {
            assert_eq!(a["changed_labels"].as_u64().unwrap() as usize, ix.len(), "{name}");
        }
    }
    // BadNets at 5% of 3000 samples, all relabelled to the target class 0.
    let v = poison("badnets", "0", &[]);
    assert_eq!(v["indices"].as_array().unwrap().len(), 150);
}

#[test]
fn trigger_stamps_every_image_and_returns_target_labels() {
    let v = audit(&[
        "plugins",
        "run",
        "badnets",
        "--op",
        "trigger",
        "--data",
        data(),
        "--limit",
        "500",
        "--json",
        "--param",
        "target=3",
    ])
    .expect_code(0)
    .json();
    assert_eq!(v["data"]["split"], "test");
    // A white 3x3 corner patch changes every image that was not already white there.
    assert!(v["changed_images"].as_u64().unwrap() >= 450, "{v:#}");
}

#[test]
fn poisoned_npz_round_trips_through_numpy_and_the_loader() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("poisoned.npz");
    let out_s = out.to_str().unwrap();
    let v = poison("badnets", "5", &["--out", out_s]);
    assert_eq!(v["output"], out_s);
    // The file feeds straight back into --data.
    let back = audit(&[
        "plugins", "run", "blend", "--op", "poison", "--data", out_s, "--limit", "100", "--json",
    ])
    .expect_code(0)
    .json();
    assert_eq!(back["data"]["n"], 100);
    if let Some(py) = python() {
        let script = "import numpy as np, sys\n\
            d = np.load(sys.argv[1])\n\
            x, y, t, idx = d['x_train'], d['y_train'], d['x_test'], d['poison_idx']\n\
            assert x.shape == (3000, 1, 28, 28) and x.dtype == np.uint8, x.shape\n\
            assert t.shape[1:] == (1, 28, 28)\n\
            assert len(idx) == 150 and (y[idx] == 0).all()\n\
            assert (x[idx][:, :, -3:, -3:] == 255).all()\n\
            print('ok', len(idx))";
        let stdout = sh(Command::new(py).args(["-c", script, out_s]));
        assert_eq!(stdout.trim(), "ok 150");
    }
}

#[test]
fn outputs_are_never_clobbered_without_force() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.npz");
    std::fs::write(&out, b"precious").unwrap();
    let args = [
        "plugins",
        "run",
        "badnets",
        "--op",
        "trigger",
        "--data",
        "synthetic",
        "--limit",
        "4",
        "--out",
        "x.npz",
    ];
    let r = audit_in(dir.path(), &args).expect_code(2);
    assert!(
        r.stderr.contains("already exists") && r.stderr.contains("--force"),
        "{}",
        r.stderr
    );
    assert_eq!(std::fs::read(&out).unwrap(), b"precious");
    let mut forced = args.to_vec();
    forced.push("--force");
    audit_in(dir.path(), &forced).expect_code(0);
    assert_ne!(std::fs::read(&out).unwrap(), b"precious");
    // No temporary files are left behind.
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 1, "{names:?}");
}

#[test]
fn bad_data_is_a_usage_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("broken.npz");
    std::fs::write(&bad, b"PK\x03\x04 not really a zip").unwrap();
    let r = audit(&["plugins", "run", "badnets", "--data", bad.to_str().unwrap()]).expect_code(2);
    assert!(r.stderr.contains("broken.npz"), "{}", r.stderr);
    let r = audit(&["plugins", "run", "badnets", "--data", dir.path().to_str().unwrap()]).expect_code(2);
    assert!(r.stderr.contains("train-images-idx3-ubyte"), "{}", r.stderr);
}

fn sha256_of(path: &std::path::Path) -> String {
    sh(Command::new("sha256sum").arg(path))
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

#[test]
fn finding_13_harden_records_each_plugins_library_and_sha256() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let p = |n: &str| dir.join(n).to_str().unwrap().to_string();
    audit_tests::zoo_small_cnn(dir);
    let h = audit_in(
        dir,
        &[
            "harden",
            "m.onnx",
            "--defense",
            "finetune",
            "--data",
            "synthetic",
            "--limit",
            "64",
            "--param",
            "epochs=1",
            "--eval-attack",
            "badnets",
            "--device",
            "cpu",
            "--json",
            "--report",
            &p("r.json"),
            "--report",
            &p("r.md"),
        ],
    )
    .expect_code(0);
    // The default clean subset (1,000) does not fit the synthetic test split (500): half of it
    // is lent, with a warning, instead of a refusal.
    assert!(h.stderr.contains("lending 250 (half of them)"), "{}", h.stderr);
    let h = h.json();
    assert_eq!(
        (h["n_clean"].as_u64(), h["n_test"].as_u64()),
        (Some(250), Some(250)),
        "{h:#}"
    );
    let plugins = std::fs::canonicalize(audit_tests::bundled_plugins()).unwrap();
    let finetune = plugins.join("libaudit_plugin_finetune.so");
    let badnets = plugins.join("libaudit_plugin_badnets.so");
    let (f_sha, b_sha) = (sha256_of(&finetune), sha256_of(&badnets));
    assert_eq!(h["defense_library"], finetune.to_str().unwrap(), "{h:#}");
    assert_eq!(h["defense_sha256"], f_sha.as_str());
    let r: Value = serde_json::from_str(&std::fs::read_to_string(p("r.json")).unwrap()).unwrap();
    assert_eq!(r["rows"][0]["library"], finetune.to_str().unwrap());
    assert_eq!(r["rows"][0]["library_sha256"], f_sha.as_str());
    assert_eq!(r["eval_attack"]["library"], badnets.to_str().unwrap());
    assert_eq!(r["eval_attack"]["sha256"], b_sha.as_str());
    let md = std::fs::read_to_string(p("r.md")).unwrap();
    assert!(md.contains(&f_sha) && md.contains(&b_sha), "{md}");
}
