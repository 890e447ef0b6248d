//! Signals and cancellation: the cancel flag plugins poll, the temporary files a hard exit must
//! remove, and the child processes it must stop.
//!
//! - The first SIGINT (Ctrl-C) sets the cancel flag: training stops at the next step, nothing is
//!   written, the command exits with [`crate::error::EXIT_CANCELLED`] (130).
//! - A second SIGINT, or SIGTERM or SIGHUP at any time, exits at once: it removes the partial
//!   files this process registered, sends SIGTERM to the child processes it started, and calls
//!   `_exit(128 + signal)`. `_exit` runs no destructors, atexit hooks or C++ static destructors,
//!   so libtorch worker threads are never torn down under a running kernel (the cause of the
//!   SIGSEGVs `std::process::exit` gave from the handler thread).
//! - SIGKILL cannot be caught: partial files carry the writer's pid in their name
//!   (see [`crate::output`]) and the next run in that folder removes those whose writer is gone.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};

use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};

static CANCELLED: AtomicBool = AtomicBool::new(false);
static HANDLER: OnceLock<()> = OnceLock::new();
static PARTIALS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
static CHILDREN: Mutex<Vec<u32>> = Mutex::new(Vec::new());

/// Installs the handlers once (a thread waiting on SIGINT, SIGTERM and SIGHUP).
pub fn install() {
    HANDLER.get_or_init(|| {
        let Ok(mut signals) = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP]) else {
            return;
        };
        let _ = std::thread::Builder::new().name("audit-signals".into()).spawn(move || {
            for sig in signals.forever() {
                if sig == SIGINT && !CANCELLED.swap(true, Ordering::SeqCst) {
                    forward_to_children(libc::SIGINT);
                    eprintln!("\naudit: cancelling (Ctrl-C again to quit at once)");
                    continue;
                }
                CANCELLED.store(true, Ordering::SeqCst);
                hard_exit(128 + sig);
            }
        });
    });
}

/// True once the user pressed Ctrl-C (or the process was told to stop).
pub fn is_cancelled() -> bool {
    CANCELLED.load(Ordering::SeqCst)
}

/// Removes the registered partial files, stops the children and leaves at once.
fn hard_exit(code: i32) -> ! {
    forward_to_children(libc::SIGTERM);
    // The main thread may be in the middle of registering: wait for the lock, it is held briefly.
    let partials = PARTIALS.lock().map(|p| p.clone()).unwrap_or_default();
    for p in &partials {
        let _ = std::fs::remove_file(p);
    }
    eprintln!("audit: stopped at once (exit {code}); no output was written");
    // SAFETY: _exit only ends the process; it touches no Rust or C++ state.
    unsafe { libc::_exit(code) }
}

fn forward_to_children(sig: i32) {
    let kids = CHILDREN.lock().map(|c| c.clone()).unwrap_or_default();
    for pid in kids {
        if let Ok(pid) = i32::try_from(pid) {
            // SAFETY: kill has no memory effects; a pid that has exited gives ESRCH, ignored.
            unsafe { libc::kill(pid, sig) };
        }
    }
}

/// A partial file a hard exit must remove (until [`forget_partial`]).
pub fn register_partial(path: &Path) {
    if let Ok(mut p) = PARTIALS.lock() {
        p.push(path.to_path_buf());
    }
}

/// The partial file was renamed into place or removed.
pub fn forget_partial(path: &Path) {
    if let Ok(mut p) = PARTIALS.lock() {
        p.retain(|q| q != path);
    }
}

/// A child process the signals must reach (Ctrl-C is forwarded, a hard exit stops it).
pub fn register_child(pid: u32) {
    if let Ok(mut c) = CHILDREN.lock() {
        c.push(pid);
    }
}

/// The child has exited.
pub fn forget_child(pid: u32) {
    if let Ok(mut c) = CHILDREN.lock() {
        c.retain(|&q| q != pid);
    }
}

/// Environment variable: print `@phase COMMAND:PHASE` on stderr at each phase boundary.
pub const PHASE_LINES_ENV: &str = "AUDIT_PHASE_LINES";
/// Environment variable (fault tests): `COMMAND:PHASE` at which to pause for
/// [`HOLD_SECONDS_ENV`] seconds (default 5), so a test can signal the process in that phase.
pub const HOLD_PHASE_ENV: &str = "AUDIT_HOLD_PHASE";
/// Environment variable: how long [`HOLD_PHASE_ENV`] pauses.
pub const HOLD_SECONDS_ENV: &str = "AUDIT_HOLD_SECONDS";

/// Marks the start of a phase (`harden:train`, `attack:commit`, ...): a line on stderr when
/// [`PHASE_LINES_ENV`] is 1, a pause when [`HOLD_PHASE_ENV`] names it. The phases are `load`
/// (inputs read), `train` (the plugin or the training runs), `write` (outputs staged) and
/// `commit` (staged outputs about to be put in place).
pub fn phase(name: &str) {
    if std::env::var(PHASE_LINES_ENV).is_ok_and(|v| v == "1") {
        eprintln!("@phase {name}");
    }
    if std::env::var(HOLD_PHASE_ENV).is_ok_and(|v| v == name) {
        let secs = std::env::var(HOLD_SECONDS_ENV)
            .ok()
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(5.0);
        std::thread::sleep(std::time::Duration::from_secs_f64(secs.clamp(0.0, 600.0)));
    }
}
