//! Harness for the end-to-end tests: runs the built `audit` binary (`make build` puts it and the
//! bundled plugins under target/release) in temporary folders and captures what it prints.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The repository root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// The cargo target folder.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"))
}

/// The release binary; the tests need `make build` (or `make test`) to have run.
pub fn audit_bin() -> PathBuf {
    let bin = target_dir().join("release/audit");
    assert!(
        bin.is_file(),
        "{} is missing: run `make build` (make test does) before these tests",
        bin.display()
    );
    bin
}

/// Folder of the bundled plugins (installed by `make build`).
pub fn bundled_plugins() -> PathBuf {
    target_dir().join("release/plugins")
}

/// What a finished command printed.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    fn from(out: Output) -> Run {
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Asserts the exit code, printing everything on failure.
    pub fn expect_code(self, code: i32) -> Run {
        assert_eq!(
            self.code, code,
            "exit code {} (wanted {code})\nstdout:\n{}\nstderr:\n{}",
            self.code, self.stdout, self.stderr
        );
        self
    }

    /// Parses stdout as one JSON document.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}):\n{}\nstderr:\n{}", self.stdout, self.stderr))
    }
}

/// Runs `audit ARGS` with a clean plugin environment (no AUDIT_PLUGIN_PATH) in `cwd`.
pub fn audit_in(cwd: &Path, args: &[&str]) -> Run {
    let out = Command::new(audit_bin())
        .args(args)
        .current_dir(cwd)
        .env_remove("AUDIT_PLUGIN_PATH")
        .env_remove("LD_LIBRARY_PATH")
        .output()
        .expect("spawn audit");
    Run::from(out)
}

/// `DIR/m.onnx`: a freshly initialised small CNN for 1x28x28 inputs and 10 classes (`audit zoo`,
/// instant), for tests that need some model rather than a trained one.
pub fn zoo_small_cnn(dir: &Path) -> PathBuf {
    audit_in(
        dir,
        &[
            "zoo",
            "small-cnn",
            "--input",
            "1x28x28",
            "--classes",
            "10",
            "--out",
            "m.onnx",
        ],
    )
    .expect_code(0);
    dir.join("m.onnx")
}

/// Runs `audit ARGS` in the repository root.
pub fn audit(args: &[&str]) -> Run {
    audit_in(&root(), args)
}

/// Runs any command, asserting success, and returns stdout.
pub fn sh(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let run = Run::from(out);
    assert_eq!(
        run.code, 0,
        "{cmd:?} failed\nstdout:\n{}\nstderr:\n{}",
        run.stdout, run.stderr
    );
    run.stdout
}

/// Compiles a C plugin with the system compiler against sdk/include. `defines` are `-D` flags.
pub fn compile_c(src: &Path, out: &Path, defines: &[&str]) -> PathBuf {
    let mut cmd = Command::new(std::env::var("CC").unwrap_or_else(|_| "cc".into()));
    cmd.args(["-shared", "-fPIC", "-O1", "-std=c11", "-Wall"])
        .arg("-I")
        .arg(root().join("sdk/include"))
        .args(defines.iter().map(|d| format!("-D{d}")))
        .arg(src)
        .arg("-o")
        .arg(out);
    sh(&mut cmd);
    out.to_path_buf()
}

/// `--data` for tests: the real Fashion-MNIST when installed (scripts/setup installs it), else the
/// synthetic set, announced on stderr.
pub fn data() -> &'static str {
    if Path::new("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").is_file() {
        "fashion-mnist"
    } else {
        eprintln!("note: Fashion-MNIST is not installed; using the synthetic dataset");
        "synthetic"
    }
}

/// The set-up's Python (for cross-checks with numpy), if present.
pub fn python() -> Option<PathBuf> {
    let p = root().join(".venv/bin/python");
    p.is_file().then_some(p)
}

/// (clean accuracy, attack success rate) of a metrics object (`before`/`after` of a harden report,
/// `metrics` of an attack).
pub fn acc_asr(metrics: &serde_json::Value) -> (f64, f64) {
    let get = |k: &str| metrics[k].as_f64().unwrap_or_else(|| panic!("no `{k}` in {metrics}"));
    (get("clean_accuracy"), get("attack_success_rate"))
}
