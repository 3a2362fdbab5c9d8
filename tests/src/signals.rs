//! Ctrl-C for the long-running binaries (demo, benchmarks): SIGINT and SIGTERM become a flag the
//! program checks between steps, so its guards tear the sandbox down instead of the process dying
//! with namespaces, cgroups and pins left behind.

use std::sync::atomic::{AtomicBool, Ordering};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Blocks SIGINT and SIGTERM in every thread and waits for them in one thread, which sets the
/// flag and prints `message`. Call it first in `main`, before any other thread starts.
pub fn install(message: &'static str) {
    // SAFETY: sigset manipulation on a local set; pthread_sigmask affects this thread and is
    // inherited by threads spawned afterwards (all of them: this runs first).
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&raw mut set);
        libc::sigaddset(&raw mut set, libc::SIGINT);
        libc::sigaddset(&raw mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &raw const set, std::ptr::null_mut());
        let set_copy = set;
        std::thread::spawn(move || {
            let mut sig = 0;
            // SAFETY: sigwait on a valid set and an owned int.
            libc::sigwait(&raw const set_copy, &raw mut sig);
            INTERRUPTED.store(true, Ordering::Relaxed);
            eprintln!("\n{message}");
        });
    }
}

/// Whether SIGINT or SIGTERM arrived.
#[must_use]
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::Relaxed)
}

/// Panics (unwinding through the guards) if SIGINT or SIGTERM arrived.
pub fn check() {
    assert!(!interrupted(), "interrupted");
}
