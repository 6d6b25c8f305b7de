//! Signals that would otherwise kill mixq without a word: SIGBUS when a memory-mapped input file
//! is truncated under it (reported, exit 3), and SIGXFSZ at a file-size limit (ignored, so the
//! write fails with an error that names the file).

const SIGBUS_MESSAGE: &[u8] = b"error: an input file was truncated or replaced while mixq was reading it (SIGBUS); \
nothing was written to the output; rerun when the input is complete\n";

extern "C" fn on_sigbus(_: libc::c_int) {
    // SAFETY: write(2) and _exit(2) are async-signal-safe; the message is a static byte string.
    unsafe {
        libc::write(2, SIGBUS_MESSAGE.as_ptr().cast(), SIGBUS_MESSAGE.len());
        libc::_exit(3);
    }
}

/// Installs the handlers; called once at start.
pub fn install() {
    // SAFETY: installing a handler that only calls async-signal-safe functions, and SIG_IGN.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_sigbus as *const () as usize;
        libc::sigemptyset(&mut action.sa_mask);
        libc::sigaction(libc::SIGBUS, &action, std::ptr::null_mut());
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
}
