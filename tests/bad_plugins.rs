//! Broken plugins: each gives a clear message naming the file and the reason, the host never
//! crashes, and the good plugins keep working beside them.

use std::path::{Path, PathBuf};

use audit_tests::{audit, bundled_plugins, compile_c, root, target_dir};
use serde_json::{json, Value};

/// A plugin folder with every C fixture compiled, a panicking Rust plugin, a text file posing as
/// a library, and manifests written by hand (as a careless third party would ship them).
struct BadDir {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
}

fn manifest(dir: &Path, name: &str, lib: &str, abi: u32) {
    let m = json!({
        "manifest_version": 1, "name": name, "kind": "attack", "version": "0.0.1",
        "abi_version": abi, "library": lib, "description": format!("broken fixture {name}"),
    });
    std::fs::write(dir.join(format!("{name}.plugin.json")), m.to_string()).unwrap();
}

fn bad_dir() -> BadDir {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let fixtures = root().join("tests/fixtures/c");
    for stem in [
        "abi_v2",
        "no_entry",
        "null_descriptor",
        "bad_schema",
        "null_response",
        "inconsistent",
        "small_descriptor",
        "run_fails",
    ] {
        let lib = format!("lib{stem}.so");
        compile_c(&fixtures.join(format!("{stem}.c")), &dir.join(&lib), &[]);
        // A plugin that negotiates v1 claims v1 in its manifest; abi_v2 claims 1 too, as a lying
        // manifest would: the host must catch the mismatch at negotiation.
        manifest(&dir, &stem.replace('_', "-"), &lib, 1);
    }
    std::fs::write(dir.join("libtext.so"), "this is not a shared library\n").unwrap();
    manifest(&dir, "text", "libtext.so", 1);
    let panic_lib = target_dir().join("release/libaudit_fixture_panic.so");
    assert!(panic_lib.is_file(), "{} missing: run `make build`", panic_lib.display());
    std::fs::copy(&panic_lib, dir.join("libpanicky.so")).unwrap();
    manifest(&dir, "panicky", "libpanicky.so", 1);
    BadDir { _tmp: tmp, dir }
}

fn check(bad: &BadDir) -> (i32, Value) {
    let r = audit(&["--plugin-dir", bad.dir.to_str().unwrap(), "plugins", "check", "--json"]);
    let code = r.code;
    (code, r.json())
}

fn error_of(v: &Value, name: &str) -> String {
    let row = v["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == name)
        .unwrap_or_else(|| panic!("{name} missing: {v:#}"));
    assert_eq!(row["ok"], false, "{name} should be broken: {row}");
    row["error"].as_str().unwrap().to_string()
}

#[test]
fn check_reports_each_broken_plugin_with_file_and_reason() {
    let bad = bad_dir();
    let (code, v) = check(&bad);
    assert_eq!(code, 2, "{v:#}");
    let cases = [
        ("abi-v2", "libabi_v2.so", "speaks plugin ABI v2"),
        ("no-entry", "libno_entry.so", "no `audit_plugin_negotiate` symbol"),
        ("null-descriptor", "libnull_descriptor.so", "descriptor pointer is null"),
        ("bad-schema", "libbad_schema.so", "not valid JSON"),
        ("small-descriptor", "libsmall_descriptor.so", "struct_size is 8"),
        ("text", "libtext.so", "not a loadable shared library"),
    ];
    for (name, file, reason) in cases {
        let e = error_of(&v, name);
        assert!(e.contains(file) && e.contains(reason), "{name}: {e}");
    }
    // The plugins that load fine are reported fine, and the bundled ones still work.
    for ok in [
        "null-response",
        "inconsistent",
        "run-fails",
        "panicky",
        "badnets",
        "wanet",
    ] {
        let row = v["plugins"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == ok)
            .unwrap();
        assert_eq!(row["ok"], true, "{row}");
    }
    assert_eq!(v["broken"], 6);
}

#[test]
fn list_reads_manifests_without_running_plugin_code() {
    let bad = bad_dir();
    manifest(&bad.dir, "future", "libabi_v2.so", 2);
    let v = audit(&["--plugin-dir", bad.dir.to_str().unwrap(), "plugins", "list", "--json"])
        .expect_code(0)
        .json();
    let rows = v["plugins"].as_array().unwrap();
    let future = rows.iter().find(|p| p["name"] == "future").unwrap();
    assert!(future["problem"].as_str().unwrap().contains("ABI v2"), "{future}");
    // The text file is listed from its manifest; nothing loaded it.
    assert_eq!(rows.iter().find(|p| p["name"] == "text").unwrap()["status"], "ok");
    assert!(rows.iter().any(|p| p["name"] == "badnets"));
}

fn run_bad(bad: &BadDir, name: &str, op: &str) -> audit_tests::Run {
    audit(&[
        "--plugin-dir",
        bad.dir.to_str().unwrap(),
        "plugins",
        "run",
        name,
        "--op",
        op,
        "--data",
        "synthetic",
        "--limit",
        "16",
    ])
}

#[test]
fn failures_at_run_time_are_reported_and_contained() {
    let bad = bad_dir();
    let r = run_bad(&bad, "panicky", "trigger").expect_code(1);
    assert!(
        r.stderr.contains("panicky") && r.stderr.contains("panicked: deliberate panic in trigger"),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("libpanicky.so"), "{}", r.stderr);
    let r = run_bad(&bad, "panicky", "poison").expect_code(1);
    assert!(r.stderr.contains("plugin bug"), "{}", r.stderr);
    let r = run_bad(&bad, "null-response", "trigger").expect_code(1);
    assert!(
        r.stderr.contains("invalid response") && r.stderr.contains("no images returned"),
        "{}",
        r.stderr
    );
    let r = run_bad(&bad, "inconsistent", "trigger").expect_code(1);
    assert!(
        r.stderr.contains("invalid response") && r.stderr.contains("byte_len 10"),
        "{}",
        r.stderr
    );
    let r = run_bad(&bad, "run-fails", "trigger").expect_code(1);
    assert!(
        r.stderr.contains("model exploded on purpose") && r.stderr.contains("librun_fails.so"),
        "{}",
        r.stderr
    );
    let r = run_bad(&bad, "abi-v2", "trigger").expect_code(2);
    assert!(
        r.stderr.contains("libabi_v2.so") && r.stderr.contains("ABI v2"),
        "{}",
        r.stderr
    );
    let r = run_bad(&bad, "text", "trigger").expect_code(2);
    assert!(r.stderr.contains("libtext.so"), "{}", r.stderr);
    // With all of that on the search path, a good plugin still runs.
    run_bad(&bad, "badnets", "trigger").expect_code(0);
}

#[test]
fn install_refuses_a_broken_plugin_and_installs_a_good_one() {
    let bad = bad_dir();
    let dest = tempfile::tempdir().unwrap();
    let d = dest.path().to_str().unwrap();
    let r = audit(&[
        "plugins",
        "install",
        "--dir",
        d,
        bad.dir.join("libabi_v2.so").to_str().unwrap(),
    ])
    .expect_code(2);
    assert!(r.stderr.contains("ABI v2"), "{}", r.stderr);
    let good = bundled_plugins().join("libaudit_plugin_badnets.so");
    audit(&["plugins", "install", "--dir", d, good.to_str().unwrap()]).expect_code(0);
    let m: Value =
        serde_json::from_str(&std::fs::read_to_string(dest.path().join("badnets.plugin.json")).unwrap()).unwrap();
    assert_eq!(m["abi_version"], 1);
    assert_eq!(m["library"], "libaudit_plugin_badnets.so");
    // A second install without --force refuses, with a hint.
    let r = audit(&["plugins", "install", "--dir", d, good.to_str().unwrap()]).expect_code(2);
    assert!(r.stderr.contains("--force"), "{}", r.stderr);
    audit(&["plugins", "install", "--force", "--dir", d, good.to_str().unwrap()]).expect_code(0);
}

#[test]
fn ctrl_c_cancels_a_running_plugin_and_leaves_no_output() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    compile_c(
        &root().join("tests/fixtures/c/slow_cancel.c"),
        &dir.join("libslow_cancel.so"),
        &[],
    );
    audit(&[
        "plugins",
        "install",
        "--dir",
        dir.to_str().unwrap(),
        dir.join("libslow_cancel.so").to_str().unwrap(),
    ])
    .expect_code(0);
    let out = dir.join("never.npz");
    let started = std::time::Instant::now();
    let mut child = std::process::Command::new(audit_tests::audit_bin())
        .args([
            "--plugin-dir",
            dir.to_str().unwrap(),
            "plugins",
            "run",
            "slow-cancel",
            "--data",
            "synthetic",
            "--limit",
            "4",
        ])
        .args(["--out", out.to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until the plugin says it runs (a busy machine can take seconds to start the binary).
    let mut err = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut seen = String::new();
    loop {
        let mut line = String::new();
        let n = std::io::BufRead::read_line(&mut err, &mut line).unwrap();
        assert!(n > 0, "audit ended before the plugin started:\n{seen}");
        seen.push_str(&line);
        if line.contains("started, waiting for Ctrl-C") {
            break;
        }
    }
    let sent = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut err, &mut rest).unwrap();
    let res = child.wait_with_output().unwrap();
    let stderr = seen + &rest;
    // A cancelled command exits 130, whoever noticed the cancel first (here the plugin).
    assert_eq!(res.status.code(), Some(130), "{stderr}");
    assert!(
        stderr.contains("slow-cancel") && stderr.contains("was cancelled"),
        "{stderr}"
    );
    assert!(
        started.elapsed().as_secs() < 30,
        "cancellation took {:?}",
        started.elapsed()
    );
    assert!(!out.exists(), "a cancelled run left an output file");
}
