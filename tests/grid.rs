//! `audit grid` end to end: a small grid planned (bad files refused with their line), run by the
//! local backend, resumed, merged in every format; the Kubernetes manifest checked against the
//! Kubernetes API schema and its index variable exercised; and the same kind of grid submitted to
//! a real one-node Slurm cluster (scripts/slurm-cluster), resubmitted (every job skipped), with a
//! job cancelled midway and rerun.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use audit_tests::{audit, audit_bin, data, root, Run};
use serde_json::Value;

/// A grid of one model x one attack x one seed x `defenses`, sized for 2 CPU cores.
fn grid_file(dir: &Path, defenses: &str) -> PathBuf {
    let text = format!(
        "data = \"{}\"\nlimit = 2000\ntest_limit = 600\nepochs = 3\nseeds = [0]\ndevice = \"cpu\"\n\n\
         [[models]]\narch = \"small-cnn\"\n\n[[attacks]]\nname = \"badnets\"\nparams = {{ poison_rate = 0.1 }}\n\n{defenses}",
        data()
    );
    let p = dir.join("grid.toml");
    std::fs::write(&p, text).unwrap();
    p
}

const TWO_DEFENSES: &str = "[[defenses]]\nname = \"finetune\"\nparams = { epochs = 1 }\n\n\
                            [[defenses]]\nname = \"fine-pruning\"\nparams = { epochs = 1 }\n";

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn audit_env(args: &[&str], env: &[(&str, &str)]) -> Run {
    let mut c = Command::new(audit_bin());
    c.args(args).current_dir(root()).env_remove("AUDIT_PLUGIN_PATH");
    for v in INDEX_VARS {
        c.env_remove(v);
    }
    for (k, v) in env {
        c.env(k, v);
    }
    let out = c.output().unwrap();
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// The scheduler variables `grid run` reads (cleared so the tests' own environment does not leak in).
const INDEX_VARS: &[&str] = &["AUDIT_GRID_INDEX", "SLURM_ARRAY_TASK_ID", "JOB_COMPLETION_INDEX"];

fn results(dir: &Path) -> Vec<(String, Value)> {
    let mut v: Vec<(String, Value)> = std::fs::read_dir(dir.join("results"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (
                name,
                serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap(),
            )
        })
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

#[test]
fn grid_plans_runs_locally_resumes_and_merges() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("g");

    // Bad grid files are refused at plan time, naming the line and the key; nothing is created.
    let bad = grid_file(tmp.path(), "[[defenses]]\nname = \"nonesuch\"\n");
    let r = audit(&["grid", "plan", s(&bad), "--out", s(&dir)]).expect_code(2);
    assert!(
        r.stderr.contains("grid.toml line 15: defenses[0] `nonesuch`"),
        "{}",
        r.stderr
    );
    let bad = grid_file(
        tmp.path(),
        "[[defenses]]\nname = \"finetune\"\nparams = { epoch = 1 }\n",
    );
    let r = audit(&["grid", "plan", s(&bad), "--out", s(&dir)]).expect_code(2);
    assert!(
        r.stderr.contains("line 15") && r.stderr.contains("unknown parameter `epoch`"),
        "{}",
        r.stderr
    );
    let bad = grid_file(tmp.path(), "[[defenses]]\nname = \"badnets\"\n");
    let r = audit(&["grid", "plan", s(&bad), "--out", s(&dir)]).expect_code(2);
    assert!(r.stderr.contains("not defense"), "{}", r.stderr);
    assert!(!dir.exists(), "a refused plan creates nothing");

    let grid = grid_file(tmp.path(), TWO_DEFENSES);
    audit(&["grid", "plan", s(&grid), "--out", s(&dir)]).expect_code(0);
    let jobs: Vec<Value> = std::fs::read_to_string(dir.join("jobs.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(jobs.len(), 2);
    assert_eq!(jobs[1]["index"], 1);
    assert_eq!(jobs[1]["spec"]["defense"]["name"], "fine-pruning");
    assert_eq!(jobs[0]["spec_hash"].as_str().unwrap().len(), 16);
    let r = audit(&["grid", "plan", s(&grid), "--out", s(&dir)]).expect_code(2);
    assert!(r.stderr.contains("has a plan already"), "{}", r.stderr);

    // A task needs an index, within range.
    let r = audit_env(&["grid", "run", s(&dir)], &[]).expect_code(2);
    assert!(r.stderr.contains("no job index"), "{}", r.stderr);
    let r = audit_env(&["grid", "run", s(&dir)], &[("AUDIT_GRID_INDEX", "7")]).expect_code(2);
    assert!(r.stderr.contains("out of range"), "{}", r.stderr);

    // The local backend runs both jobs; the backdoored model is trained once and shared.
    let r = audit(&["grid", "emit", s(&dir), "--backend", "local", "--parallel", "2"]).expect_code(0);
    assert!(
        r.stdout.contains("2 done, 0 failed, 0 missing"),
        "{}\n{}",
        r.stdout,
        r.stderr
    );
    let res = results(&dir);
    assert_eq!(res.len(), 2);
    for (name, r) in &res {
        assert_eq!(r["status"], "ok", "{name}: {r}");
        assert!(name.ends_with(&format!("-{}.json", r["spec_hash"].as_str().unwrap())));
        assert_eq!(r["index_source"], "--index");
        let after = &r["outcome"]["after"];
        assert!(after["clean_accuracy"].as_f64().unwrap() > 0.5, "{r}");
        assert!(r["attack"]["sha256"].as_str().unwrap().len() == 64);
        assert!(r["outcome"]["defense_sha256"].as_str().unwrap().len() == 64);
    }
    let models: Vec<_> = std::fs::read_dir(dir.join("models"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.') && !n.ends_with(".lock"))
        .collect();
    assert!(models.len() == 1, "one shared attack run, got {models:?}");

    // A finished job is skipped; the Kubernetes index variable picks the job.
    let r = audit_env(&["grid", "run", s(&dir)], &[("JOB_COMPLETION_INDEX", "1")]).expect_code(0);
    assert!(
        r.stderr.contains("$JOB_COMPLETION_INDEX") && r.stderr.contains("job 1") && r.stderr.contains("skipped"),
        "{}",
        r.stderr
    );
    let st = audit(&["grid", "status", s(&dir), "--json"]).expect_code(0).json();
    assert_eq!((st["done"].as_u64(), st["missing"].as_u64()), (Some(2), Some(0)));
    assert_eq!(st["resubmit"], "");

    // A job whose result is gone shows as missing, with the array expression to resubmit.
    let gone = dir.join("results").join(&res[1].0);
    let kept = std::fs::read(&gone).unwrap();
    std::fs::remove_file(&gone).unwrap();
    let st = audit(&["grid", "status", s(&dir)]).expect_code(0);
    assert!(
        st.stdout.contains("1 done, 0 failed, 1 missing") && st.stdout.contains("--array=1"),
        "{}",
        st.stdout
    );
    std::fs::write(&gone, kept).unwrap();

    // Merged: one group (one backdoored model), one row per job, every format; the CSV has
    // BackdoorBench's columns first.
    let out = tmp.path().join("m");
    let (html, md, json, csv) = (
        out.with_extension("html"),
        out.with_extension("md"),
        out.with_extension("json"),
        out.with_extension("csv"),
    );
    audit(&[
        "grid",
        "merge",
        s(&dir),
        "--report",
        s(&html),
        "--report",
        s(&md),
        "--report",
        s(&json),
        "--report",
        s(&csv),
    ])
    .expect_code(0);
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(doc["groups"].as_array().unwrap().len(), 1);
    let rep = &doc["groups"][0]["report"];
    assert_eq!(rep["rows"].as_array().unwrap().len(), 2);
    assert_eq!(rep["baseline"]["defense"], "undefended");
    assert!(rep["baseline"]["attack_success_rate"].as_f64().is_some());
    assert!(rep["rows"][0]["der"].as_f64().is_some());
    let table = std::fs::read_to_string(&csv).unwrap();
    let lines: Vec<&str> = table.lines().collect();
    assert!(
        lines[0].starts_with("dataset,model,attack,defense,poison_rate,ACC,ASR,RA,DER,"),
        "{table}"
    );
    assert_eq!(lines.len(), 3, "{table}");
    assert!(lines[1].contains(",small-cnn,badnets,finetune,0.1"), "{table}");
    let page = std::fs::read_to_string(&html).unwrap();
    assert!(page.contains("fine-pruning") && page.contains("undefended") && !page.contains("<script"));
    assert!(std::fs::read_to_string(&md)
        .unwrap()
        .contains("| job | defense | ACC |"));
    let r = audit(&["grid", "merge", s(&dir), "--report", s(&csv)]).expect_code(2);
    assert!(r.stderr.contains("exists"), "{}", r.stderr);

    // The Kubernetes Indexed Job, validated (strictly: no unknown fields) against the API schema.
    audit(&[
        "grid",
        "emit",
        s(&dir),
        "--backend",
        "k8s",
        "--parallel",
        "2",
        "--gpus",
        "1",
    ])
    .expect_code(0);
    let manifest = dir.join("k8s-job.json");
    let m: Value = serde_json::from_str(&std::fs::read_to_string(&manifest).unwrap()).unwrap();
    assert_eq!(m["spec"]["completions"], 2);
    let validate = root().join(".venv/bin/kubernetes-validate");
    assert!(
        validate.is_file(),
        "scripts/setup installs kubernetes-validate into .venv"
    );
    let out = Command::new(&validate)
        .args(["--strict", "-k", "1.33.0"])
        .arg(&manifest)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Stops the test cluster however the test ends.
struct Cluster(PathBuf);

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(root().join("scripts/slurm-cluster"))
            .arg("stop")
            .arg(&self.0)
            .status();
    }
}

fn slurm(cmd: &str, args: &[&str], conf: &Path) -> Run {
    let out = Command::new(cmd)
        .args(args)
        .env("SLURM_CONF", conf)
        .env_remove("AUDIT_PLUGIN_PATH")
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

#[test]
fn grid_runs_on_a_real_slurm_cluster() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("slurm");
    let start = Command::new("bash")
        .arg(root().join("scripts/slurm-cluster"))
        .arg("start")
        .arg(&state)
        .output()
        .unwrap();
    let _cluster = Cluster(state.clone());
    if start.status.code() == Some(77) {
        eprintln!(
            "SKIPPED: Slurm cannot start here: {}",
            String::from_utf8_lossy(&start.stderr).trim()
        );
        return;
    }
    assert!(start.status.success(), "{}", String::from_utf8_lossy(&start.stderr));
    let conf = state.join("slurm.conf");

    let dir = tmp.path().join("g");
    // NAD pointed at a layer the model lacks: its job fails, and that is a result (the task exits 0).
    let grid = grid_file(
        tmp.path(),
        &format!("{TWO_DEFENSES}\n[[defenses]]\nname = \"nad\"\nparams = {{ layers = \"no_such_value\" }}\n"),
    );
    audit(&["grid", "plan", s(&grid), "--out", s(&dir)]).expect_code(0);
    audit(&["grid", "emit", s(&dir), "--backend", "slurm", "--parallel", "2"]).expect_code(0);
    let script = dir.join("slurm.sbatch");
    assert!(std::fs::read_to_string(&script)
        .unwrap()
        .contains("#SBATCH --array=0-2%2"));

    // Submitted and waited for (sbatch --wait exits 0 only when every task did): every job has a
    // result, read its index from Slurm; the failed defense's says why.
    slurm("sbatch", &["--wait", s(&script)], &conf).expect_code(0);
    let res = results(&dir);
    assert_eq!(res.len(), 3, "{res:?}");
    for (i, (_, r)) in res.iter().enumerate() {
        assert_eq!(r["status"], if i == 2 { "failed" } else { "ok" }, "{r}");
        assert_eq!(r["index_source"], "$SLURM_ARRAY_TASK_ID");
    }
    assert!(
        res[2].1["error"].as_str().unwrap().contains("no_such_value"),
        "{}",
        res[2].1
    );
    let stamps: Vec<String> = res.iter().map(|r| r.1["started"].to_string()).collect();

    // Resubmitting the whole array is safe: the finished jobs are skipped, the failed one runs again.
    slurm("sbatch", &["--wait", s(&script)], &conf).expect_code(0);
    let again: Vec<String> = results(&dir).iter().map(|r| r.1["started"].to_string()).collect();
    assert_eq!(stamps[..2], again[..2], "no finished job ran twice");
    for i in 0..2 {
        let log = std::fs::read_to_string(dir.join(format!("logs/{i}.log"))).unwrap();
        assert!(log.contains("skipped"), "task {i}: {log}");
    }

    // A job cancelled midway leaves no result (status: missing) and is rerun by resubmitting
    // what status names. The task holds in the defense's training so it is surely midway.
    let victim = &res[1].0;
    std::fs::remove_file(dir.join("results").join(victim)).unwrap();
    let id = slurm(
        "sbatch",
        &[
            "--parsable",
            "--array=1",
            "--export=ALL,AUDIT_PHASE_LINES=1,AUDIT_HOLD_PHASE=harden:train,AUDIT_HOLD_SECONDS=120",
            s(&script),
        ],
        &conf,
    )
    .expect_code(0)
    .stdout
    .trim()
    .to_string();
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let log = std::fs::read_to_string(dir.join("logs/1.log")).unwrap_or_default();
        if log.contains("@phase harden:train") {
            break;
        }
        assert!(Instant::now() < deadline, "the task never reached harden:train:\n{log}");
        std::thread::sleep(Duration::from_millis(500));
    }
    slurm("scancel", &[&id], &conf).expect_code(0);
    let deadline = Instant::now() + Duration::from_secs(120);
    while !slurm("squeue", &["-h", "-j", &id], &conf).stdout.trim().is_empty() {
        assert!(Instant::now() < deadline, "the cancelled task did not end");
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(
        !dir.join("results").join(victim).exists(),
        "a cancelled job leaves no result"
    );
    let st = audit(&["grid", "status", s(&dir), "--json"]).expect_code(0).json();
    assert_eq!(
        (st["done"].as_u64(), st["failed"].as_u64(), st["missing"].as_u64()),
        (Some(1), Some(1), Some(1)),
        "{st}"
    );
    let array = st["resubmit"].as_str().unwrap().to_string();
    assert_eq!(array, "1-2");
    slurm("sbatch", &["--wait", &format!("--array={array}"), s(&script)], &conf).expect_code(0);
    let st = audit(&["grid", "status", s(&dir), "--json"]).expect_code(0).json();
    assert_eq!((st["done"].as_u64(), st["failed"].as_u64()), (Some(2), Some(1)), "{st}");

    // Merged: every job is a row of the one backdoored model's group, the failed one with its error.
    let merged = tmp.path().join("merged.json");
    audit(&["grid", "merge", s(&dir), "--report", s(&merged)]).expect_code(0);
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(&merged).unwrap()).unwrap();
    assert_eq!(
        (doc["done"].as_u64(), doc["failed"].as_u64()),
        (Some(2), Some(1)),
        "{doc}"
    );
    let rows = doc["groups"][0]["report"]["rows"].as_array().unwrap();
    let status: Vec<&str> = rows.iter().map(|r| r["status"].as_str().unwrap()).collect();
    assert_eq!(status, ["ok", "ok", "failed"]);
    assert!(rows[2]["error"].as_str().unwrap().contains("no_such_value"));
}
