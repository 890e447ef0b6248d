//! Output files, all or none.
//!
//! A command plans every file it will write before its work starts ([`Outputs::plan`]: refused
//! when it is an input, when two flags name the same file, when it exists without `--force`
//! (a dangling symlink counts), when its folder is missing, not a folder or not writable). The
//! work then stages each file beside its destination under an obviously partial name
//! (`.NAME.audit-partial-PID-XXXXXX`, registered with [`crate::signals`] so a hard exit removes
//! it) and [`Outputs::commit`] puts them all in place at the very end: without `--force` with
//! create-new semantics (a file that appeared meanwhile is not replaced), with `--force` keeping a
//! hard-linked backup of each replaced file until every rename succeeded, so a failure part way
//! restores what was there. A cancelled command commits nothing. Partial files a SIGKILLed run
//! left are removed by the next run that plans an output in that folder (their writer's pid is
//! gone).

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::error::{cancelled, input_error, input_error_hint};

/// Marker in the name of a staged file.
pub const PARTIAL_MARK: &str = ".audit-partial-";

/// The files one command writes.
#[derive(Debug)]
pub struct Outputs {
    force: bool,
    inputs: Vec<PathBuf>,
    planned: Vec<(String, PathBuf)>,
    staged: Vec<Staged>,
}

#[derive(Debug)]
struct Staged {
    tmp: tempfile::TempPath,
    dest: PathBuf,
}

/// `path` made absolute without resolving its last component (a symlink stays itself).
fn absolute(path: &Path) -> PathBuf {
    let name = path.file_name().map(PathBuf::from).unwrap_or_default();
    let dir = folder_of(path);
    std::fs::canonicalize(dir).map_or_else(|_| path.to_path_buf(), |d| d.join(name))
}

/// The folder a file is written in (`.` for a bare name).
fn folder_of(path: &Path) -> &Path {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

impl Outputs {
    /// Outputs of a command that reads `inputs` (files or folders; missing ones are ignored).
    pub fn new(force: bool, inputs: &[&Path]) -> Outputs {
        Outputs {
            force,
            inputs: inputs.iter().filter_map(|p| std::fs::canonicalize(p).ok()).collect(),
            planned: Vec::new(),
            staged: Vec::new(),
        }
    }

    /// Checks one output location before any work; `flag` names it in errors (`--out`).
    pub fn plan(&mut self, flag: &str, path: &Path) -> Result<()> {
        let shown = path.display();
        if path.file_name().is_none() {
            return Err(input_error(format!("{flag} {shown}: not a file name")));
        }
        let abs = absolute(path);
        if let Ok(real) = std::fs::canonicalize(path) {
            if self.inputs.contains(&real) {
                return Err(input_error(format!(
                    "{flag} {shown}: refusing to overwrite an input file"
                )));
            }
        }
        if let Some((other, _)) = self.planned.iter().find(|(_, p)| *p == abs) {
            return Err(input_error(format!("{flag} and {other} name the same file {shown}")));
        }
        let dir = folder_of(path);
        match std::fs::metadata(dir) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(input_error(format!(
                    "{flag} {shown}: {} is not a folder",
                    dir.display()
                )))
            }
            Err(e) => return Err(input_error(format!("{flag} {shown}: folder {}: {e}", dir.display()))),
        }
        remove_stale_partials(dir);
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            if meta.is_dir() {
                return Err(input_error(format!("{flag} {shown} is a folder")));
            }
            if !self.force {
                let what = if meta.file_type().is_symlink() && !path.exists() {
                    "exists (a dangling symlink)"
                } else {
                    "already exists"
                };
                return Err(input_error_hint(
                    format!("{shown} {what}"),
                    "pass --force to replace it",
                ));
            }
        }
        // Writable: create (and drop) a staged file the way the real one will be made.
        new_partial(path)
            .map_err(|e| input_error(format!("{flag} {shown}: cannot write in {}: {e}", dir.display())))?;
        self.planned.push((flag.to_string(), abs));
        Ok(())
    }

    /// Stages `path` (planned before) with what `write` puts in the file.
    pub fn stage_with(&mut self, path: &Path, write: impl FnOnce(&mut File) -> Result<()>) -> Result<()> {
        debug_assert!(
            self.planned.iter().any(|(_, p)| *p == absolute(path)),
            "unplanned output {}",
            path.display()
        );
        if crate::signals::is_cancelled() {
            return Err(cancelled());
        }
        let mut tmp = new_partial(path).with_context(|| format!("writing {}", path.display()))?;
        crate::signals::register_partial(tmp.path());
        let written = write(tmp.as_file_mut())
            .and_then(|()| tmp.as_file_mut().flush().map_err(Into::into))
            .and_then(|()| tmp.as_file().sync_all().map_err(Into::into));
        let tmp = tmp.into_temp_path();
        if let Err(e) = written {
            crate::signals::forget_partial(&tmp);
            return Err(e.context(format!("writing {}", path.display())));
        }
        self.staged.push(Staged {
            tmp,
            dest: path.to_path_buf(),
        });
        Ok(())
    }

    /// Stages `path` with `bytes`.
    pub fn stage(&mut self, path: &Path, bytes: &[u8]) -> Result<()> {
        self.stage_with(path, |f| f.write_all(bytes).map_err(Into::into))
    }

    /// Puts every staged file in place, or none (see the module's doc). Refused once cancelled.
    pub fn commit(mut self) -> Result<()> {
        if crate::signals::is_cancelled() {
            return Err(cancelled());
        }
        let staged = std::mem::take(&mut self.staged);
        let mut done: Vec<(PathBuf, Option<PathBuf>)> = Vec::new();
        let mut pending = staged.into_iter();
        let failure = loop {
            let Some(s) = pending.next() else { break None };
            let backup = if self.force { backup_of(&s.dest) } else { None };
            let tmp_path = s.tmp.to_path_buf();
            let result = if self.force {
                s.tmp.persist(&s.dest).map_err(|e| e.error)
            } else {
                s.tmp.persist_noclobber(&s.dest).map_err(|e| e.error)
            };
            crate::signals::forget_partial(&tmp_path);
            match result {
                Ok(()) => done.push((s.dest, backup)),
                Err(e) => {
                    if let Some(b) = &backup {
                        let _ = std::fs::remove_file(b);
                    }
                    let msg = if e.kind() == std::io::ErrorKind::AlreadyExists {
                        input_error_hint(
                            format!("{} appeared while this command ran; not replaced", s.dest.display()),
                            "pass --force to replace it",
                        )
                    } else {
                        anyhow::Error::new(e).context(format!("writing {}", s.dest.display()))
                    };
                    break Some(msg);
                }
            }
        };
        if let Some(err) = failure {
            // Undo: restore what was replaced, remove what was created; the rest is dropped.
            for (dest, backup) in done.into_iter().rev() {
                match backup {
                    Some(b) => {
                        let _ = std::fs::rename(&b, &dest);
                    }
                    None => {
                        let _ = std::fs::remove_file(&dest);
                    }
                }
            }
            for s in pending {
                crate::signals::forget_partial(&s.tmp);
            }
            return Err(err.context("no output was written"));
        }
        for (_, backup) in done {
            if let Some(b) = backup {
                let _ = std::fs::remove_file(b);
            }
        }
        Ok(())
    }
}

impl Drop for Outputs {
    fn drop(&mut self) {
        // TempPath removes its file; only the signal registry needs telling.
        for s in &self.staged {
            crate::signals::forget_partial(&s.tmp);
        }
    }
}

/// A new, empty partial file beside `dest`, mode 0666 less the umask (what a plain write gives).
fn new_partial(dest: &Path) -> std::io::Result<tempfile::NamedTempFile> {
    use std::os::unix::fs::PermissionsExt;
    let name = dest.file_name().and_then(|n| n.to_str()).unwrap_or("output");
    tempfile::Builder::new()
        .prefix(&format!(".{name}{PARTIAL_MARK}{}-", std::process::id()))
        .permissions(std::fs::Permissions::from_mode(0o666))
        .tempfile_in(folder_of(dest))
}

/// A hard link to the file `--force` is about to replace, to restore it if a later rename fails.
fn backup_of(dest: &Path) -> Option<PathBuf> {
    std::fs::symlink_metadata(dest).ok()?;
    let name = dest.file_name()?.to_str()?;
    for i in 0..16 {
        let b = folder_of(dest).join(format!(".{name}{PARTIAL_MARK}{}-backup{i}", std::process::id()));
        if std::fs::hard_link(dest, &b).is_ok() {
            return Some(b);
        }
    }
    None
}

/// The pid in a partial file's name, if it is one.
fn partial_pid(name: &str) -> Option<i32> {
    let rest = &name[name.find(PARTIAL_MARK)? + PARTIAL_MARK.len()..];
    rest.split('-').next()?.parse().ok()
}

/// Removes partial files in `dir` whose writer is no longer running.
fn remove_stale_partials(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name.to_str().filter(|n| n.starts_with('.')).and_then(partial_pid) else {
            continue;
        };
        if pid != std::process::id() as i32 && !alive(pid) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

fn alive(pid: i32) -> bool {
    // SAFETY: kill with signal 0 only checks that the process exists.
    let r = unsafe { libc::kill(pid, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn all_outputs_land_together_and_nothing_partial_stays() {
        let d = tempfile::tempdir().unwrap();
        let (a, b) = (d.path().join("a.onnx"), d.path().join("b.json"));
        let mut o = Outputs::new(false, &[]);
        o.plan("--out", &a).unwrap();
        o.plan("--report", &b).unwrap();
        o.stage(&a, b"model").unwrap();
        assert!(!a.exists(), "nothing is in place before commit");
        o.stage(&b, b"{}").unwrap();
        o.commit().unwrap();
        assert_eq!(names(d.path()), ["a.onnx", "b.json"]);
        assert_eq!(std::fs::read(&a).unwrap(), b"model");
    }

    #[test]
    fn finding_9_two_flags_naming_one_file_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("x.npz");
        let mut o = Outputs::new(false, &[]);
        o.plan("--out", &p).unwrap();
        let e = o
            .plan("--poisoned-data", &d.path().join(".").join("x.npz"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("--poisoned-data and --out name the same file"), "{e}");
    }

    #[test]
    fn finding_1_an_input_is_never_an_output_even_with_force() {
        let d = tempfile::tempdir().unwrap();
        let data = d.path().join("data.npz");
        std::fs::write(&data, b"precious").unwrap();
        let mut o = Outputs::new(true, &[&data]);
        let e = o.plan("--out", &data).unwrap_err().to_string();
        assert!(e.contains("refusing to overwrite an input file"), "{e}");
        // Through a symlink too.
        let link = d.path().join("link.npz");
        std::os::unix::fs::symlink(&data, &link).unwrap();
        assert!(o.plan("--out", &link).is_err());
        assert_eq!(std::fs::read(&data).unwrap(), b"precious");
    }

    #[test]
    fn finding_5_a_missing_or_read_only_folder_is_refused_before_the_work() {
        let d = tempfile::tempdir().unwrap();
        let mut o = Outputs::new(false, &[]);
        let e = o
            .plan("--report", &d.path().join("no/such/r.html"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("--report") && e.contains("no/such"), "{e}");
        let file = d.path().join("f");
        std::fs::write(&file, b"").unwrap();
        let e = o.plan("--report", &file.join("r.md")).unwrap_err().to_string();
        assert!(e.contains("not a folder"), "{e}");
        let ro = d.path().join("ro");
        std::fs::create_dir(&ro).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o555)).unwrap();
        // root ignores permission bits; the check is meaningful only for other users.
        if std::fs::write(ro.join("probe"), b"").is_err() {
            let e = o.plan("--out", &ro.join("m.onnx")).unwrap_err().to_string();
            assert!(e.contains("cannot write in"), "{e}");
        }
        assert!(names(d.path()).iter().all(|n| !n.contains(PARTIAL_MARK)));
    }

    #[test]
    fn finding_7_a_file_that_appears_meanwhile_is_not_replaced() {
        let d = tempfile::tempdir().unwrap();
        let (a, b) = (d.path().join("a.onnx"), d.path().join("b.md"));
        let mut o = Outputs::new(false, &[]);
        o.plan("--out", &a).unwrap();
        o.plan("--report", &b).unwrap();
        o.stage(&a, b"new").unwrap();
        o.stage(&b, b"new").unwrap();
        std::fs::write(&b, b"someone else's").unwrap();
        let e = format!("{:#}", o.commit().unwrap_err());
        assert!(e.contains("appeared while this command ran"), "{e}");
        assert_eq!(std::fs::read(&b).unwrap(), b"someone else's");
        assert!(!a.exists(), "all or none: the first output was taken back");
        assert_eq!(names(d.path()), ["b.md"]);
    }

    #[test]
    fn finding_7_a_dangling_symlink_counts_as_an_existing_output() {
        let d = tempfile::tempdir().unwrap();
        let link = d.path().join("m.onnx");
        std::os::unix::fs::symlink(d.path().join("gone"), &link).unwrap();
        let e = Outputs::new(false, &[]).plan("--out", &link).unwrap_err().to_string();
        assert!(e.contains("dangling symlink"), "{e}");
    }

    #[test]
    fn force_replaces_and_a_later_failure_restores_the_replaced_file() {
        let d = tempfile::tempdir().unwrap();
        let (a, b) = (d.path().join("a.onnx"), d.path().join("b.md"));
        std::fs::write(&a, b"old").unwrap();
        let mut o = Outputs::new(true, &[]);
        o.plan("--out", &a).unwrap();
        o.plan("--report", &b).unwrap();
        o.stage(&a, b"new").unwrap();
        o.stage(&b, b"new").unwrap();
        // b's destination becomes a folder: its rename fails after a's succeeded.
        std::fs::create_dir(&b).unwrap();
        std::fs::write(b.join("keep"), b"").unwrap();
        assert!(o.commit().is_err());
        assert_eq!(std::fs::read(&a).unwrap(), b"old", "the replaced file is back");
        assert_eq!(names(d.path()), ["a.onnx", "b.md"]);
    }

    #[test]
    fn finding_6_partials_of_a_killed_writer_are_removed_by_the_next_run() {
        let d = tempfile::tempdir().unwrap();
        // A pid that cannot be running (above the kernel's pid_max).
        let stale = d.path().join(format!(".m.onnx{PARTIAL_MARK}99999999-abc123"));
        let live = d
            .path()
            .join(format!(".m.onnx{PARTIAL_MARK}{}-abc123", std::process::id()));
        std::fs::write(&stale, b"half").unwrap();
        std::fs::write(&live, b"mine").unwrap();
        Outputs::new(false, &[])
            .plan("--out", &d.path().join("m.onnx"))
            .unwrap();
        assert!(!stale.exists());
        assert!(live.exists(), "a running writer's partial file is left alone");
        assert_eq!(partial_pid(".x.audit-partial-42-Xy"), Some(42));
        assert_eq!(partial_pid("x.onnx"), None);
    }

    #[test]
    fn atomic_writes_get_ordinary_permissions() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("out.txt");
        let mut o = Outputs::new(false, &[]);
        o.plan("--out", &p).unwrap();
        o.stage(&p, b"hello").unwrap();
        o.commit().unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"hello");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "no temporary left");
        // The same mode a plain write gets under this umask (tempfile alone would give 0600).
        let plain = dir.path().join("plain.txt");
        std::fs::write(&plain, b"x").unwrap();
        let mode = |q: &std::path::Path| std::fs::metadata(q).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&p), mode(&plain));
    }

    #[test]
    fn dropping_uncommitted_outputs_leaves_nothing() {
        let d = tempfile::tempdir().unwrap();
        let a = d.path().join("a.onnx");
        let mut o = Outputs::new(false, &[]);
        o.plan("--out", &a).unwrap();
        o.stage(&a, b"x").unwrap();
        drop(o);
        assert!(names(d.path()).is_empty());
    }
}
