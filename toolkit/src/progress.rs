//! Progress bars on stderr (hidden when stderr is not a terminal) and the Ctrl-C flag.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

static CANCELLED: AtomicBool = AtomicBool::new(false);
static HANDLER: OnceLock<()> = OnceLock::new();

/// Installs the Ctrl-C handler once: the first Ctrl-C sets the cancel flag (plugins see it through
/// `is_cancelled`), a second one exits at once with code 130.
pub fn install_ctrlc() {
    HANDLER.get_or_init(|| {
        let _ = ctrlc::set_handler(|| {
            if CANCELLED.swap(true, Ordering::SeqCst) {
                std::process::exit(130);
            }
            eprintln!("\naudit: cancelling (Ctrl-C again to quit at once)");
        });
    });
}

/// True once the user pressed Ctrl-C.
pub fn is_cancelled() -> bool {
    CANCELLED.load(Ordering::SeqCst)
}

/// A progress display keyed by phase name: a new phase finishes the previous bar and starts a new one.
#[derive(Debug, Default)]
pub struct Progress {
    current: Mutex<Option<(String, ProgressBar)>>,
}

impl Progress {
    /// Reports `done` of `total` for `phase` (prefixed by `owner`, e.g. the plugin name).
    pub fn update(&self, owner: &str, phase: &str, done: u64, total: u64) {
        let Ok(mut cur) = self.current.lock() else { return };
        let key = format!("{owner}: {phase}");
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
