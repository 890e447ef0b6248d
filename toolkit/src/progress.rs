//! Progress bars on stderr (hidden when stderr is not a terminal); the Ctrl-C flag is in `signals`.

use std::sync::{Mutex, OnceLock};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Environment variable that turns bars into `@progress {json}` lines on stderr: `audit compare`
/// sets it for the `audit harden` runs it starts and draws their progress itself.
pub const LINES_ENV: &str = "AUDIT_PROGRESS_LINES";
/// Prefix of a progress line.
pub const LINE_PREFIX: &str = "@progress ";

fn lines_mode() -> bool {
    static MODE: OnceLock<bool> = OnceLock::new();
    *MODE.get_or_init(|| std::env::var(LINES_ENV).is_ok_and(|v| v == "1"))
}

/// A progress line: phase, done, total.
pub fn parse_line(line: &str) -> Option<(String, u64, u64)> {
    let v: serde_json::Value = serde_json::from_str(line.strip_prefix(LINE_PREFIX)?).ok()?;
    Some((
        v["phase"].as_str()?.to_string(),
        v["done"].as_u64()?,
        v["total"].as_u64()?,
    ))
}

/// A progress display keyed by phase name: a new phase finishes the previous bar and starts a new one.
#[derive(Debug, Default)]
pub struct Progress {
    current: Mutex<Option<(String, ProgressBar)>>,
    /// Lines mode: the last phase and percentage written.
    last_line: Mutex<Option<(String, u64)>>,
}

impl Progress {
    /// Reports `done` of `total` for `phase` (prefixed by `owner`, e.g. the plugin name).
    pub fn update(&self, owner: &str, phase: &str, done: u64, total: u64) {
        let key = format!("{owner}: {phase}");
        if lines_mode() {
            // At most one line per percent of each phase.
            let pct = (done.min(total) * 100).checked_div(total).unwrap_or(0);
            let Ok(mut last) = self.last_line.lock() else { return };
            if last.as_ref().is_some_and(|(k, p)| *k == key && *p == pct) {
                return;
            }
            *last = Some((key.clone(), pct));
            eprintln!(
                "{LINE_PREFIX}{}",
                serde_json::json!({"phase": key, "done": done, "total": total})
            );
            return;
        }
        let Ok(mut cur) = self.current.lock() else { return };
        let same = matches!(&*cur, Some((k, _)) if *k == key);
        if !same {
            if let Some((_, bar)) = cur.take() {
                bar.finish_and_clear();
            }
            let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
            bar.set_style(
                ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {elapsed_precise} eta {eta}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
            );
            bar.set_prefix(key.clone());
            *cur = Some((key, bar));
        }
        if let Some((_, bar)) = &*cur {
            bar.set_length(total.max(done));
            bar.set_position(done);
            if total > 0 && done >= total {
                bar.finish_and_clear();
            }
        }
    }

    /// Prints a line without tearing the bar.
    pub fn println(&self, line: &str) {
        match self.current.lock().ok().as_deref() {
            Some(Some((_, bar))) if !bar.is_finished() => bar.suspend(|| eprintln!("{line}")),
            _ => eprintln!("{line}"),
        }
    }

    /// Clears any bar left.
    pub fn finish(&self) {
        if let Ok(mut cur) = self.current.lock() {
            if let Some((_, bar)) = cur.take() {
                bar.finish_and_clear();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_lines_parse() {
        assert_eq!(
            parse_line(r#"@progress {"phase":"nad: NAD epoch 1/2","done":3,"total":10}"#),
            Some(("nad: NAD epoch 1/2".to_string(), 3, 10))
        );
        assert_eq!(parse_line("[nad] info: hello"), None);
        assert_eq!(parse_line("@progress {not json"), None);
    }
}
