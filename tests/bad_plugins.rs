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

/// Runs `audit ARGS` in `cwd` with extra environment variables (and no inherited plugin path).
fn audit_env(cwd: &Path, env: &[(&str, &str)], args: &[&str]) -> audit_tests::Run {
    let mut cmd = std::process::Command::new(audit_tests::audit_bin());
    cmd.args(args)
        .current_dir(cwd)
        .env_remove("AUDIT_PLUGIN_PATH")
        .env_remove("LD_LIBRARY_PATH");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("spawn audit");
    audit_tests::Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

const NOISE: [&str; 7] = [
    "NOISY-CTOR-PRINTF",
    "NOISY-CTOR-RAW",
    "NOISY-NEGOTIATE-PUTS",
    "NOISY-RUN-PRINTF",
    "NOISY-RUN-PARTIAL-NO-NEWLINE",
    "NOISY-RUN-RAW",
    "NOISY-RELEASE-PUTS",
];

#[test]
fn finding_10_plugin_stdout_goes_to_stderr_and_json_output_stays_json() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::create_dir_all(dir.join("build")).unwrap();
    let lib = compile_c(
        &root().join("tests/fixtures/c/noisy_stdout.c"),
        &dir.join("build/libnoisy_stdout.so"),
        &[],
    );
    let plugins = dir.join("plugins");
    let d = plugins.to_str().unwrap();
    // Installing loads the library (its constructor and negotiation print): nothing on stdout.
    let r = audit(&["plugins", "install", "--dir", d, lib.to_str().unwrap()]).expect_code(0);
    assert!(!r.stdout.contains("NOISY"), "install stdout: {}", r.stdout);
    assert!(
        r.stderr.contains("NOISY-CTOR-PRINTF") && r.stderr.contains("NOISY-NEGOTIATE-PUTS"),
        "{}",
        r.stderr
    );

    // A run with --json: stdout is exactly one JSON document; the plugin's text is on stderr.
    let r = audit(&[
        "--plugin-dir",
        d,
        "plugins",
        "run",
        "noisy-stdout",
        "--op",
        "trigger",
        "--data",
        "synthetic",
        "--limit",
        "8",
        "--json",
    ])
    .expect_code(0);
    let v = r.json();
    assert_eq!(v["plugin"]["name"], "noisy-stdout", "{v:#}");
    assert_eq!(v["data"]["n"], 8);
    assert!(!r.stdout.contains("NOISY"), "stdout: {}", r.stdout);
    for marker in NOISE {
        assert!(r.stderr.contains(marker), "{marker} missing from stderr:\n{}", r.stderr);
    }

    // Commands that only load (info, check) keep their JSON clean too.
    for args in [
        vec!["--plugin-dir", d, "plugins", "info", "noisy-stdout", "--json"],
        vec!["--plugin-dir", d, "plugins", "check", "--json"],
    ] {
        let r = audit(&args).expect_code(0);
        r.json();
        assert!(!r.stdout.contains("NOISY"), "{args:?}: {}", r.stdout);
        assert!(r.stderr.contains("NOISY-CTOR-RAW"), "{args:?}: {}", r.stderr);
    }
    // Without --json the host's own text still reaches stdout.
    let r = audit(&["--plugin-dir", d, "plugins", "info", "noisy-stdout"]).expect_code(0);
    assert!(r.stdout.contains("noisy-stdout (attack plugin"), "{}", r.stdout);
    assert!(!r.stdout.contains("NOISY"), "{}", r.stdout);
}

/// A folder holding only a manifest `badnets.plugin.json` whose `library` field is `library`.
fn manifest_dir(root: &Path, folder: &str, library: &str) -> PathBuf {
    let dir = root.join(folder);
    std::fs::create_dir_all(&dir).unwrap();
    let m = json!({
        "manifest_version": 1, "name": "badnets", "kind": "attack", "version": "0.1.0",
        "abi_version": 1, "library": library, "description": "hostile manifest",
    });
    std::fs::write(dir.join("badnets.plugin.json"), m.to_string()).unwrap();
    dir
}

fn trigger_with(dir: &Path) -> audit_tests::Run {
    audit(&[
        "--plugin-dir",
        dir.to_str().unwrap(),
        "plugins",
        "run",
        "badnets",
        "--op",
        "trigger",
        "--data",
        "synthetic",
        "--limit",
        "4",
    ])
}

#[test]
fn finding_13_manifest_library_outside_its_folder_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let root_dir = tmp.path();
    // A real, working plugin library outside every plugin folder.
    let outside = root_dir.join("elsewhere");
    std::fs::create_dir_all(&outside).unwrap();
    let real = outside.join("libaudit_plugin_badnets.so");
    std::fs::copy(bundled_plugins().join("libaudit_plugin_badnets.so"), &real).unwrap();

    let absolute = manifest_dir(root_dir, "absolute", real.to_str().unwrap());
    let dotdot = manifest_dir(root_dir, "dotdot", "../elsewhere/libaudit_plugin_badnets.so");
    let link = manifest_dir(root_dir, "link", "libbadnets.so");
    std::os::unix::fs::symlink(&real, link.join("libbadnets.so")).unwrap();
    let sub = manifest_dir(root_dir, "subdir-link", "lib/libaudit_plugin_badnets.so");
    std::os::unix::fs::symlink(&outside, sub.join("lib")).unwrap();
    for (dir, why) in [
        (&absolute, "is an absolute path"),
        (&dotdot, "leaves the folder"),
        (&link, "resolves through a symlink"),
        (&sub, "resolves through a symlink"),
    ] {
        // The hostile manifest shadows the bundled badnets: refused, not silently replaced by it.
        let r = trigger_with(dir).expect_code(2);
        let manifest = dir.join("badnets.plugin.json");
        assert!(
            r.stderr.contains(manifest.to_str().unwrap()) && r.stderr.contains("field `library`"),
            "{}: {}",
            dir.display(),
            r.stderr
        );
        assert!(r.stderr.contains(why), "{why}: {}", r.stderr);
        // check and list say so too.
        let v = audit(&["--plugin-dir", dir.to_str().unwrap(), "plugins", "check", "--json"])
            .expect_code(2)
            .json();
        let row = v["plugins"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["ok"] == false)
            .unwrap();
        assert!(row["error"].as_str().unwrap().contains("field `library`"), "{row}");
        let v = audit(&["--plugin-dir", dir.to_str().unwrap(), "plugins", "list", "--json"])
            .expect_code(0)
            .json();
        let row = &v["plugins"][0];
        assert_eq!(row["status"], "problem", "{row}");
        assert!(row["problem"].as_str().unwrap().contains(why), "{row}");
    }

    // Control: a symlink that stays inside the folder is fine.
    let inside = manifest_dir(root_dir, "inside", "current.so");
    std::fs::copy(&real, inside.join("libaudit_plugin_badnets-0.1.0.so")).unwrap();
    std::os::unix::fs::symlink("libaudit_plugin_badnets-0.1.0.so", inside.join("current.so")).unwrap();
    trigger_with(&inside).expect_code(0);
}

#[test]
fn finding_13_install_by_bare_name_loads_that_file_not_one_on_the_loader_path() {
    let tmp = tempfile::tempdir().unwrap();
    let cwd = tmp.path().join("cwd");
    let ld = tmp.path().join("ld");
    std::fs::create_dir_all(&cwd).unwrap();
    std::fs::create_dir_all(&ld).unwrap();
    let good = bundled_plugins().join("libaudit_plugin_badnets.so");
    let dest = tmp.path().join("dest");
    let d = dest.to_str().unwrap();
    let env = [("LD_LIBRARY_PATH", ld.to_str().unwrap())];

    // A valid plugin named bare, from its own folder, with a junk file of the same name on the
    // loader's path: the one in the current folder is installed.
    std::fs::copy(&good, cwd.join("libfoo.so")).unwrap();
    std::fs::write(ld.join("libfoo.so"), "not a library\n").unwrap();
    let r = audit_env(&cwd, &env, &["plugins", "install", "--dir", d, "libfoo.so"]).expect_code(0);
    assert!(r.stderr.contains("installed attack `badnets`"), "{}", r.stderr);
    assert_eq!(
        std::fs::read(dest.join("libfoo.so")).unwrap(),
        std::fs::read(&good).unwrap()
    );

    // The other way round: a broken file named bare, a valid one on the loader's path. The
    // broken file is refused, with the loader's own reason, and nothing is installed.
    let dest2 = tmp.path().join("dest2");
    std::fs::write(cwd.join("libbar.so"), "not a library either\n").unwrap();
    std::fs::copy(&good, ld.join("libbar.so")).unwrap();
    let r = audit_env(
        &cwd,
        &env,
        &["plugins", "install", "--dir", dest2.to_str().unwrap(), "libbar.so"],
    )
    .expect_code(2);
    let canonical = std::fs::canonicalize(cwd.join("libbar.so")).unwrap();
    assert!(
        r.stderr.contains(canonical.to_str().unwrap()) && r.stderr.contains("not a loadable shared library"),
        "{}",
        r.stderr
    );
    // dlerror's text (glibc: "file too short" / "invalid ELF header"), not a bare "dlopen failed".
    assert!(
        r.stderr.contains("file too short") || r.stderr.contains("invalid ELF header"),
        "{}",
        r.stderr
    );
    assert!(!dest2.join("badnets.plugin.json").exists());
    assert!(!dest2.join("libbar.so").exists());
}

#[test]
fn finding_13_a_plugin_shadowing_another_is_named_on_stderr() {
    let tmp = tempfile::tempdir().unwrap();
    let early = tmp.path().join("early");
    let bundled_none = bundled_plugins().join("libaudit_plugin_none.so");
    audit(&[
        "plugins",
        "install",
        "--dir",
        early.to_str().unwrap(),
        bundled_none.to_str().unwrap(),
    ])
    .expect_code(0);
    let r = audit(&[
        "--plugin-dir",
        early.to_str().unwrap(),
        "plugins",
        "info",
        "none",
        "--json",
    ])
    .expect_code(0);
    let v = r.json();
    let used = std::fs::canonicalize(early.join("libaudit_plugin_none.so")).unwrap();
    assert_eq!(v["path"], used.to_str().unwrap());
    let line = r
        .stderr
        .lines()
        .find(|l| l.contains("plugin `none` is in 2 plugin folders"))
        .unwrap_or_else(|| panic!("no shadowing warning:\n{}", r.stderr));
    assert!(line.starts_with("warning:"), "{line}");
    let (using, shadowed) = line.split_once("shadowed:").unwrap();
    assert!(
        using.contains(early.join("libaudit_plugin_none.so").to_str().unwrap()) && using.contains("--plugin-dir"),
        "{line}"
    );
    assert!(
        shadowed.contains(bundled_plugins().join("none.plugin.json").to_str().unwrap())
            && shadowed.contains("beside the binary"),
        "{line}"
    );
    // One plugin of a name: no warning.
    let r = audit(&["plugins", "info", "none", "--json"]).expect_code(0);
    assert!(!r.stderr.contains("plugin folders"), "{}", r.stderr);
}

#[test]
fn finding_13_loaded_plugins_expose_their_canonical_library_and_sha256() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("plugins");
    let real = tmp.path().join("real");
    std::fs::create_dir_all(&real).unwrap();
    // The plugin folder itself is reached through a symlink: the path reported is canonical.
    audit(&[
        "plugins",
        "install",
        "--dir",
        real.to_str().unwrap(),
        bundled_plugins().join("libaudit_plugin_blend.so").to_str().unwrap(),
    ])
    .expect_code(0);
    std::os::unix::fs::symlink(&real, &dir).unwrap();
    let v = audit(&[
        "--plugin-dir",
        dir.to_str().unwrap(),
        "plugins",
        "info",
        "blend",
        "--json",
    ])
    .expect_code(0)
    .json();
    let lib = std::fs::canonicalize(real.join("libaudit_plugin_blend.so")).unwrap();
    assert_eq!(v["path"], lib.to_str().unwrap());
    let expected = audit_tests::sh(std::process::Command::new("sha256sum").arg(&lib));
    let expected = expected.split_whitespace().next().unwrap();
    assert_eq!(v["sha256"], expected);
    let r = audit(&["--plugin-dir", dir.to_str().unwrap(), "plugins", "info", "blend"]).expect_code(0);
    assert!(r.stdout.contains(&format!("sha256:       {expected}")), "{}", r.stdout);
}

#[test]
fn finding_low_a_library_without_a_manifest_is_mentioned() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::copy(
        bundled_plugins().join("libaudit_plugin_sig.so"),
        dir.join("libstray.so"),
    )
    .unwrap();
    let d = dir.to_str().unwrap();
    let stray = dir.join("libstray.so");
    let note = format!("{}: no manifest: run audit plugins install", stray.display());
    let r = audit(&["--plugin-dir", d, "plugins", "list", "--json"]).expect_code(0);
    assert!(r.stderr.contains(&note), "{}", r.stderr);
    assert_eq!(r.json()["unmanaged"], json!([stray.to_str().unwrap()]));
    let r = audit(&["--plugin-dir", d, "plugins", "list"]).expect_code(0);
    assert!(r.stderr.contains(&note), "{}", r.stderr);
    let r = audit(&["--plugin-dir", d, "plugins", "check"]).expect_code(0);
    assert!(r.stderr.contains(&note), "{}", r.stderr);
    // Asking for it by name: the hint points at the library and at `plugins install`.
    let r = audit(&["--plugin-dir", d, "plugins", "info", "stray"]).expect_code(2);
    assert!(
        r.stderr.contains("libraries without a manifest, never used") && r.stderr.contains(stray.to_str().unwrap()),
        "{}",
        r.stderr
    );
    let r = audit(&["--plugin-dir", d, "doctor", "--json"]);
    assert!(r.stderr.contains(&note), "{}", r.stderr);
    assert_eq!(r.json()["unmanaged_libraries"], json!([stray.to_str().unwrap()]));
    let r = audit(&["--plugin-dir", d, "doctor"]);
    assert!(
        r.stdout.contains("no manifest: run audit plugins install"),
        "{}",
        r.stdout
    );
    // Installed, it is no longer a stray; the bundled folder has none.
    audit(&["plugins", "install", "--dir", d, stray.to_str().unwrap()]).expect_code(0);
    let r = audit(&["--plugin-dir", d, "plugins", "list", "--json"]).expect_code(0);
    assert!(!r.stderr.contains("no manifest"), "{}", r.stderr);
    assert_eq!(r.json()["unmanaged"], json!([]));
}

#[test]
fn finding_low_missing_plugin_folders_are_warned_about_once() {
    let tmp = tempfile::tempdir().unwrap();
    let gone = tmp.path().join("no-such-folder");
    let env_gone = tmp.path().join("not-here-either");
    let file = tmp.path().join("a-file");
    std::fs::write(&file, "x").unwrap();
    let g = gone.to_str().unwrap();
    let path = format!("{}:{}", env_gone.display(), file.display());
    let r = audit_env(
        tmp.path(),
        &[("AUDIT_PLUGIN_PATH", path.as_str())],
        &[
            "--plugin-dir",
            g,
            "--plugin-dir",
            g,
            "plugins",
            "info",
            "badnets",
            "--json",
        ],
    )
    .expect_code(0);
    r.json();
    let warning = format!("warning: plugin folder {g} (--plugin-dir) does not exist; ignored");
    assert_eq!(r.stderr.matches(&warning).count(), 1, "{}", r.stderr);
    assert!(
        r.stderr.contains(&format!(
            "warning: plugin folder {} (AUDIT_PLUGIN_PATH) does not exist",
            env_gone.display()
        )),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr.contains(&format!(
            "warning: plugin folder {} (AUDIT_PLUGIN_PATH) is not a folder",
            file.display()
        )),
        "{}",
        r.stderr
    );
    // Existing folders: no warning.
    let r = audit(&["--plugin-dir", tmp.path().to_str().unwrap(), "plugins", "list"]).expect_code(0);
    assert!(!r.stderr.contains("warning: plugin folder"), "{}", r.stderr);
}
