//! Keeps plugin output off the host's stdout.
//!
//! `--json` commands print one JSON document on stdout; a plugin that prints there (from a
//! library constructor at load, from negotiation or from `run`) would corrupt it. While a
//! [`StdoutToStderr`] guard lives, file descriptor 1 points at file descriptor 2, so whatever a
//! plugin writes to stdout (Rust `println!`, C `printf`/`puts`, raw `write(1, ...)`) lands on
//! stderr. Guards nest and may be held from several threads at once: a process-wide counter
//! redirects on the first and restores on the last.
//!
//! Limits: a Rust plugin's own `print!` without a newline stays in that plugin's private stdout
//! buffer (the host cannot flush it) and may reach the real stdout later. C stdio buffers are
//! shared with the host and are flushed before fd 1 is restored.

use std::io::Write;
use std::sync::Mutex;

/// Nesting depth and the saved descriptor of the real stdout (-1 when not saved).
struct State {
    depth: usize,
    saved: i32,
}

static STATE: Mutex<State> = Mutex::new(State { depth: 0, saved: -1 });

fn lock() -> std::sync::MutexGuard<'static, State> {
    // A panic while holding the lock leaves consistent integers; keep going.
    STATE.lock().unwrap_or_else(|e| e.into_inner())
}

/// While alive, fd 1 is a duplicate of fd 2. See the module docs.
#[derive(Debug)]
#[must_use = "stdout is redirected only while the guard lives"]
pub struct StdoutToStderr {
    _private: (),
}

impl StdoutToStderr {
    /// Redirects fd 1 to fd 2 (or joins a redirection already in place). When fd 1 cannot be
    /// saved or redirected (no fd 2, descriptors exhausted) the guard does nothing: losing the
    /// redirection is better than losing stdout.
    pub fn new() -> StdoutToStderr {
        let mut st = lock();
        if st.depth == 0 {
            // What the host printed so far belongs on the real stdout.
            let _ = std::io::stdout().flush();
            // SAFETY: fflush(NULL) flushes every C stdio output stream; dup/dup2 act on plain
            // descriptors and report failure by returning -1.
            unsafe {
                libc::fflush(std::ptr::null_mut());
                let saved = libc::dup(1);
                if saved >= 0 {
                    if libc::dup2(2, 1) >= 0 {
                        st.saved = saved;
                    } else {
                        libc::close(saved);
                        st.saved = -1;
                    }
                } else {
                    st.saved = -1;
                }
            }
        }
        st.depth += 1;
        StdoutToStderr { _private: () }
    }

    /// True while some guard redirects fd 1 (for tests and diagnostics).
    pub fn active() -> bool {
        let st = lock();
        st.depth > 0 && st.saved >= 0
    }
}

impl Default for StdoutToStderr {
    fn default() -> Self {
        StdoutToStderr::new()
    }
}

impl Drop for StdoutToStderr {
    fn drop(&mut self) {
        let mut st = lock();
        st.depth = st.depth.saturating_sub(1);
        if st.depth == 0 && st.saved >= 0 {
            // Anything written to stdout while redirected (plugin C stdio buffers, the host's own
            // Rust stdout buffer) goes to stderr, where it was meant to go.
            let _ = std::io::stdout().flush();
            // SAFETY: as in `new`; `saved` is a descriptor we own.
            unsafe {
                libc::fflush(std::ptr::null_mut());
                libc::dup2(st.saved, 1);
                libc::close(st.saved);
            }
            st.saved = -1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::StdoutToStderr;

    #[test]
    fn guards_nest_and_restore_on_the_last_drop() {
        // Other unit tests may hold a guard concurrently (they call plugins), so check the
        // descriptor identity of fd 1 against fd 2 only through our own nesting.
        let fstat = |fd: i32| {
            // SAFETY: a zeroed stat is a valid out-parameter.
            let mut s: libc::stat = unsafe { std::mem::zeroed() };
            // SAFETY: valid pointer.
            let rc = unsafe { libc::fstat(fd, &mut s) };
            assert_eq!(rc, 0);
            (s.st_dev, s.st_ino)
        };
        let outer = StdoutToStderr::new();
        assert!(StdoutToStderr::active());
        assert_eq!(fstat(1), fstat(2), "fd 1 points at stderr");
        {
            let _inner = StdoutToStderr::new();
            assert_eq!(fstat(1), fstat(2));
        }
        assert!(StdoutToStderr::active(), "an inner drop must not restore early");
        assert_eq!(fstat(1), fstat(2));
        drop(outer);
        let threads: Vec<_> = (0..4)
            .map(|_| {
                std::thread::spawn(|| {
                    for _ in 0..50 {
                        let _g = StdoutToStderr::new();
                        assert!(StdoutToStderr::active());
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
    }
}
