//! SIGINT and SIGTERM: the first sets a flag the run polls (the guests are stopped as
//! interrupted, and the table, metrics and trace of what ran are still written); a second
//! one ends the process at once with the interrupted status.

use std::sync::atomic::{AtomicBool, Ordering};

/// Set by the first SIGINT or SIGTERM.
pub static INTERRUPTED: AtomicBool = AtomicBool::new(false);

#[derive(Debug, thiserror::Error)]
pub enum SignalError {
    #[error("installing the {signal} handler: {source}")]
    Install {
        signal: &'static str,
        source: std::io::Error,
    },
}

/// Runs in signal context: only async-signal-safe work (an atomic swap, `_exit`).
extern "C" fn on_signal(_: libc::c_int) {
    if INTERRUPTED.swap(true, Ordering::SeqCst) {
        // SAFETY: _exit is async-signal-safe and takes no pointers.
        unsafe { libc::_exit(crate::cli::EXIT_INTERRUPTED) };
    }
}

/// Installs the handler for SIGINT and SIGTERM (the process's: `pvsync run` installs it).
pub fn install() -> Result<(), SignalError> {
    for (signal, name) in [(libc::SIGINT, "SIGINT"), (libc::SIGTERM, "SIGTERM")] {
        // SAFETY: an all-zero sigaction is a valid value (empty mask, no flags) that is
        // filled in below.
        let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
        action.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
        // SA_RESTART: the VMM's blocking calls go on; the run polls the flag instead.
        action.sa_flags = libc::SA_RESTART;
        // SAFETY: `action` is initialised and outlives the call; the old action is not
        // wanted (null is allowed); the handler only touches an atomic and calls _exit.
        let rc = unsafe { libc::sigaction(signal, &action, std::ptr::null_mut()) };
        if rc != 0 {
            return Err(SignalError::Install {
                signal: name,
                source: std::io::Error::last_os_error(),
            });
        }
    }
    Ok(())
}
