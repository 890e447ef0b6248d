//! The fault suite: SIGINT once and twice, SIGTERM and SIGKILL in each phase (load, train, write,
//! commit) of harden, attack and compare; missing, read-only and full output folders. After each:
//! no input changed, no output that looks complete, no stray partial file after the next run.
//!
//! Phases are found with the binary's `AUDIT_PHASE_LINES=1` (`@phase harden:train` lines on
//! stderr); `AUDIT_HOLD_PHASE=harden:commit` pauses the run there so a signal lands in that phase.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

use audit_tests::{audit_bin, audit_in};

/// A running `audit` whose stderr lines arrive on a channel.
struct Running {
    child: Child,
    lines: Receiver<String>,
    seen: Vec<String>,
}

fn spawn(cwd: &Path, args: &[&str], env: &[(&str, &str)]) -> Running {
    let mut cmd = Command::new(audit_bin());
    cmd.args(args)
        .current_dir(cwd)
        .env_remove("AUDIT_PLUGIN_PATH")
        .env("AUDIT_PHASE_LINES", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn audit");
    let stderr = child.stderr.take().expect("piped");
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    Running {
        child,
        lines: rx,
        seen: Vec::new(),
    }
}

impl Running {
    /// Waits (up to 120 s) for the `@phase NAME` line.
    fn wait_phase(&mut self, name: &str) {
        let deadline = Instant::now() + Duration::from_secs(120);
        let want = format!("@phase {name}");
        while Instant::now() < deadline {
            if let Ok(line) = self.lines.recv_timeout(Duration::from_millis(200)) {
                let hit = line == want;
                self.seen.push(line);
                if hit {
                    return;
                }
            } else if let Ok(Some(status)) = self.child.try_wait() {
                panic!("audit exited ({status}) before {want}:\n{}", self.seen.join("\n"));
            }
        }
        panic!("no {want} within 120 s:\n{}", self.seen.join("\n"));
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args(["-s", sig, &self.child.id().to_string()])
            .status()
            .expect("kill")
            .success();
        assert!(ok, "kill -s {sig} failed");
    }

    /// Waits for the exit: (exit code or 128 + signal, everything it printed on stderr).
    fn finish(mut self) -> (i32, String) {
        use std::os::unix::process::ExitStatusExt;
        let status = self.child.wait().expect("wait");
        self.seen.extend(self.lines.iter());
        let code = status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0));
        (code, self.seen.join("\n"))
    }
}

/// Runs `audit ARGS` in `cwd` held `hold` seconds in `phase`, sends `signals` there (100 ms
/// apart) and waits for the exit: (exit code or 128 + signal, stderr).
fn stop_in(cwd: &Path, args: &[&str], phase: &str, hold: &str, signals: &[&str]) -> (i32, String) {
    let mut r = spawn(cwd, args, &[("AUDIT_HOLD_PHASE", phase), ("AUDIT_HOLD_SECONDS", hold)]);
    r.wait_phase(phase);
    for s in signals {
        r.signal(s);
        std::thread::sleep(Duration::from_millis(100));
    }
    r.finish()
}

fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn partials(dir: &Path) -> Vec<String> {
    listing(dir)
        .into_iter()
        .filter(|n| n.contains(".audit-partial-"))
        .collect()
}

fn sha(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A freshly initialised model to harden (instant to make; hardening works on any weights).
fn model(dir: &Path) -> PathBuf {
    audit_tests::zoo_small_cnn(dir)
}

const QUICK: &[&str] = &["--data", "synthetic", "--limit", "300", "--param", "E2=1"];

fn harden_args<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec!["harden", "m.onnx", "--report", "r.html", "--report", "r.json"];
    v.extend_from_slice(QUICK);
    v.extend_from_slice(extra);
    v
}

/// The folder holds exactly the inputs, unchanged.
fn only_inputs(dir: &Path, before: &[u8]) {
    assert_eq!(listing(dir), ["m.onnx"], "outputs or partial files were left");
    assert_eq!(sha(&dir.join("m.onnx")), before, "the input changed");
}

#[test]
fn finding_2_a_second_sigint_during_training_exits_130_without_a_crash() {
    // Before: 7 of 9 runs died of SIGSEGV (std::process::exit from the handler thread ran C++
    // static destructors under libtorch's workers). Three tries, each must exit 130 cleanly.
    let d = tempfile::tempdir().unwrap();
    let before = sha(&model(d.path()));
    for _ in 0..3 {
        let mut r = spawn(
            d.path(),
            &[
                "harden",
                "m.onnx",
                "--data",
                "synthetic",
                "--limit",
                "2000",
                "--param",
                "E2=30",
            ],
            &[],
        );
        r.wait_phase("harden:train");
        std::thread::sleep(Duration::from_millis(1500));
        r.signal("INT");
        std::thread::sleep(Duration::from_millis(100));
        r.signal("INT");
        let (code, err) = r.finish();
        assert_eq!(code, 130, "{err}");
        assert!(!err.contains("INTERNAL ASSERT") && !err.contains("panicked"), "{err}");
        only_inputs(d.path(), &before);
    }
}

#[test]
fn finding_6_one_sigint_in_any_phase_writes_nothing_and_exits_130() {
    let d = tempfile::tempdir().unwrap();
    let before = sha(&model(d.path()));
    for phase in ["harden:load", "harden:train", "harden:write", "harden:commit"] {
        let (code, err) = stop_in(d.path(), &harden_args(&[]), phase, "3", &["INT"]);
        assert_eq!(code, 130, "{phase}: {err}");
        assert!(err.contains("cancelled"), "{phase}: {err}");
        only_inputs(d.path(), &before);
    }
}

#[test]
fn finding_6_sigint_twice_sigterm_and_sighup_remove_the_staged_files() {
    let d = tempfile::tempdir().unwrap();
    let before = sha(&model(d.path()));
    for (signals, code) in [(&["INT", "INT"][..], 130), (&["TERM"][..], 143), (&["HUP"][..], 129)] {
        for phase in ["harden:load", "harden:train", "harden:write", "harden:commit"] {
            let mut r = spawn(
                d.path(),
                &harden_args(&[]),
                &[("AUDIT_HOLD_PHASE", phase), ("AUDIT_HOLD_SECONDS", "20")],
            );
            r.wait_phase(phase);
            if phase == "harden:commit" {
                // Staged: the model and both reports sit beside their destinations, partial.
                assert_eq!(partials(d.path()).len(), 3, "{:?}", listing(d.path()));
            }
            for s in signals {
                r.signal(s);
                std::thread::sleep(Duration::from_millis(100));
            }
            let started = Instant::now();
            let (got, err) = r.finish();
            assert_eq!(got, code, "{signals:?} at {phase}: {err}");
            assert!(
                started.elapsed() < Duration::from_secs(15),
                "{signals:?} did not stop it at once"
            );
            only_inputs(d.path(), &before);
        }
    }
}

#[test]
fn finding_6_sigkill_leaves_only_obvious_partials_and_the_next_run_removes_them() {
    let d = tempfile::tempdir().unwrap();
    let before = sha(&model(d.path()));
    let mut r = spawn(
        d.path(),
        &harden_args(&[]),
        &[("AUDIT_HOLD_PHASE", "harden:commit"), ("AUDIT_HOLD_SECONDS", "20")],
    );
    r.wait_phase("harden:commit");
    r.signal("KILL");
    let (code, _) = r.finish();
    assert_eq!(code, 137);
    // What a SIGKILL leaves is hidden and named partial, never the output's own name.
    let left = partials(d.path());
    assert_eq!(left.len(), 3, "{:?}", listing(d.path()));
    assert!(left.iter().all(|n| n.starts_with('.')), "{left:?}");
    assert!(!d.path().join("m.hardened.onnx").exists());
    assert_eq!(sha(&d.path().join("m.onnx")), before);
    // The next run in that folder completes and leaves no stray partial file.
    audit_in(d.path(), &harden_args(&[])).expect_code(0);
    assert_eq!(listing(d.path()), ["m.hardened.onnx", "m.onnx", "r.html", "r.json"]);
}

#[test]
fn finding_6_attack_cancelled_in_each_phase_writes_nothing() {
    let d = tempfile::tempdir().unwrap();
    let args = [
        "attack",
        "badnets",
        "--data",
        "synthetic",
        "--arch",
        "small-cnn",
        "--limit",
        "300",
        "--epochs",
        "1",
        "--out",
        "a.onnx",
        "--poisoned-data",
        "a.npz",
    ];
    for (phase, sigs, code) in [
        ("attack:load", &["INT"][..], 130),
        ("attack:train", &["TERM"][..], 143),
        ("attack:train", &["INT", "INT"][..], 130),
        ("attack:write", &["INT"][..], 130),
        ("attack:commit", &["TERM"][..], 143),
        ("attack:commit", &["KILL"][..], 137),
    ] {
        let (got, err) = stop_in(d.path(), &args, phase, "20", sigs);
        assert_eq!(got, code, "{phase} {sigs:?}: {err}");
        let visible: Vec<String> = listing(d.path()).into_iter().filter(|n| !n.starts_with('.')).collect();
        assert!(visible.is_empty(), "{phase}: {:?}", listing(d.path()));
        if sigs != ["KILL"] {
            assert!(
                listing(d.path()).is_empty(),
                "{phase} {sigs:?}: {:?}",
                listing(d.path())
            );
        }
    }
    // Uninterrupted, both outputs land, and the killed run's partial files are gone.
    audit_in(d.path(), &args).expect_code(0);
    assert_eq!(listing(d.path()), ["a.npz", "a.onnx"]);
}

#[test]
fn finding_9_attack_out_and_poisoned_data_cannot_be_one_file() {
    let d = tempfile::tempdir().unwrap();
    let r = audit_in(
        d.path(),
        &[
            "attack",
            "badnets",
            "--data",
            "synthetic",
            "--arch",
            "small-cnn",
            "--limit",
            "50",
            "--epochs",
            "1",
            "--out",
            "x",
            "--poisoned-data",
            "./x",
        ],
    )
    .expect_code(2);
    assert!(
        r.stderr.contains("--poisoned-data and --out name the same file"),
        "{}",
        r.stderr
    );
    assert!(listing(d.path()).is_empty());
}

#[test]
fn finding_8_compare_cancelled_in_the_parent_stops_its_child_and_leaves_nothing() {
    let d = tempfile::tempdir().unwrap();
    let before = sha(&model(d.path()));
    std::fs::create_dir(d.path().join("kept")).unwrap();
    let mut r = spawn(
        d.path(),
        &[
            "compare",
            "m.onnx",
            "--data",
            "synthetic",
            "--limit",
            "2000",
            "--clean-size",
            "100",
            "--defenses",
            "none",
            "--param",
            "none.E2=30",
            "--out-dir",
            "kept",
            "--report",
            "c.json",
        ],
        &[],
    );
    // The child's own phase lines reach the parent's stderr only as progress; wait for training.
    r.wait_phase("compare:train");
    std::thread::sleep(Duration::from_secs(4));
    // SIGINT to the parent only (not the group): it must reach the child.
    r.signal("INT");
    let (code, err) = r.finish();
    assert_eq!(code, 130, "{err}");
    // No child left running on our model.
    std::thread::sleep(Duration::from_millis(500));
    let ours = d.path().join("m.onnx").display().to_string();
    let running: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| std::fs::read(e.ok()?.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains("harden") && c.contains(&ours))
        .collect();
    assert!(running.is_empty(), "child still running: {running:?}");
    assert_eq!(listing(d.path()), ["kept", "m.onnx"]);
    assert!(listing(&d.path().join("kept")).is_empty());
    assert_eq!(sha(&d.path().join("m.onnx")), before);
}

#[test]
fn finding_5_a_missing_report_folder_is_refused_before_any_work() {
    let d = tempfile::tempdir().unwrap();
    let before = sha(&model(d.path()));
    let started = Instant::now();
    let r = audit_in(
        d.path(),
        &["harden", "m.onnx", "--data", "synthetic", "--report", "no/such/r.html"],
    )
    .expect_code(2);
    assert!(
        r.stderr.contains("--report no/such/r.html") && r.stderr.contains("folder no/such"),
        "{}",
        r.stderr
    );
    assert!(started.elapsed() < Duration::from_secs(10), "it ran the defense first");
    only_inputs(d.path(), &before);
}

/// A tmpfs mounted over `dir` (root only); None, with the reason on stderr, where it cannot be.
struct Mount(PathBuf);

impl Mount {
    fn tmpfs(dir: &Path, opts: &str) -> Option<Mount> {
        std::fs::create_dir_all(dir).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", opts, "tmpfs"])
            .arg(dir)
            .output();
        match out {
            Ok(o) if o.status.success() => Some(Mount(dir.to_path_buf())),
            Ok(o) => {
                eprintln!(
                    "skipped: cannot mount a tmpfs ({}); needs root with CAP_SYS_ADMIN",
                    String::from_utf8_lossy(&o.stderr).trim()
                );
                None
            }
            Err(e) => {
                eprintln!("skipped: no mount command ({e})");
                None
            }
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn finding_5_a_read_only_output_folder_is_refused_before_any_work() {
    let d = tempfile::tempdir().unwrap();
    let before = sha(&model(d.path()));
    let Some(_ro) = Mount::tmpfs(&d.path().join("ro"), "ro,size=1m") else {
        return;
    };
    let r = audit_in(
        d.path(),
        &[
            "harden",
            "m.onnx",
            "--data",
            "synthetic",
            "--out",
            "h.onnx",
            "--report",
            "ro/r.md",
        ],
    )
    .expect_code(2);
    assert!(
        r.stderr.contains("--report ro/r.md: cannot write in ro"),
        "{}",
        r.stderr
    );
    assert_eq!(listing(d.path()), ["m.onnx", "ro"]);
    assert_eq!(sha(&d.path().join("m.onnx")), before);
}

#[test]
fn finding_5_a_full_disk_fails_the_run_with_nothing_written() {
    let d = tempfile::tempdir().unwrap();
    let before = sha(&model(d.path()));
    // 1 MiB: the reports fit, the 1.7 MB model does not.
    let Some(_full) = Mount::tmpfs(&d.path().join("full"), "size=1m") else {
        return;
    };
    let r = audit_in(
        d.path(),
        &harden_args(&["--out", "full/h.onnx", "--report", "full/r.md"]),
    );
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr.contains("full/h.onnx") && r.stderr.contains("No space left"),
        "{}",
        r.stderr
    );
    assert!(
        listing(&d.path().join("full")).is_empty(),
        "{:?}",
        listing(&d.path().join("full"))
    );
    assert_eq!(listing(d.path()), ["full", "m.onnx"]);
    assert_eq!(sha(&d.path().join("m.onnx")), before);
}

#[test]
fn finding_1_plugins_run_never_replaces_its_input_dataset() {
    let d = tempfile::tempdir().unwrap();
    // A real dataset file to poison, then `plugins run --data X --out X --force`.
    audit_in(
        d.path(),
        &[
            "plugins",
            "run",
            "badnets",
            "--op",
            "poison",
            "--data",
            "synthetic",
            "--limit",
            "50",
            "--out",
            "p.npz",
        ],
    )
    .expect_code(0);
    let before = sha(&d.path().join("p.npz"));
    let r = audit_in(
        d.path(),
        &[
            "plugins", "run", "badnets", "--op", "poison", "--data", "p.npz", "--out", "p.npz", "--force",
        ],
    )
    .expect_code(2);
    assert!(r.stderr.contains("refusing to overwrite an input file"), "{}", r.stderr);
    assert_eq!(sha(&d.path().join("p.npz")), before);
    assert_eq!(listing(d.path()), ["p.npz"]);
}

#[test]
fn finding_6_compare_stopped_in_each_phase_leaves_nothing() {
    let d = tempfile::tempdir().unwrap();
    let before = sha(&model(d.path()));
    std::fs::create_dir(d.path().join("kept")).unwrap();
    let args = [
        "compare",
        "m.onnx",
        "--data",
        "synthetic",
        "--limit",
        "300",
        "--clean-size",
        "100",
        "--defenses",
        "none",
        "--param",
        "none.E2=1",
        "--out-dir",
        "kept",
        "--report",
        "c.json",
        "--report",
        "c.md",
    ];
    for (phase, sig, code) in [
        ("compare:load", "TERM", 143),
        ("compare:train", "INT", 130),
        ("compare:write", "TERM", 143),
        ("compare:commit", "INT", 130),
        ("compare:commit", "KILL", 137),
    ] {
        let (got, err) = stop_in(d.path(), &args, phase, "20", &[sig]);
        assert_eq!(got, code, "{phase}: {err}");
        let visible =
            |dir: &Path| -> Vec<String> { listing(dir).into_iter().filter(|n| !n.starts_with('.')).collect() };
        assert_eq!(visible(d.path()), ["kept", "m.onnx"], "{phase}");
        assert!(visible(&d.path().join("kept")).is_empty(), "{phase}");
        if sig != "KILL" {
            assert!(
                partials(d.path()).is_empty() && partials(&d.path().join("kept")).is_empty(),
                "{phase}"
            );
        }
    }
    assert_eq!(sha(&d.path().join("m.onnx")), before);
    // A complete run afterwards leaves exactly its outputs (and removes the killed run's partials).
    audit_in(d.path(), &args).expect_code(0);
    assert_eq!(listing(d.path()), ["c.json", "c.md", "kept", "m.onnx"]);
    assert_eq!(listing(&d.path().join("kept")), ["none.onnx"]);
}

#[test]
fn finding_6_eval_stops_on_ctrl_c_with_130() {
    let d = tempfile::tempdir().unwrap();
    model(d.path());
    let (code, err) = stop_in(
        d.path(),
        &["eval", "m.onnx", "--data", "synthetic", "--json"],
        "eval:run",
        "3",
        &["INT"],
    );
    assert_eq!(code, 130, "{err}");
    assert!(err.contains("cancelled"), "{err}");
}
