//! Named crash points for the fault tests: `MIXQ_FAULT=point[:n]` in the environment kills the
//! process with SIGKILL the n-th time (default the first) the conversion reaches `point`.
//!
//! The points are `headers` (shard files created, no tensor data yet), `chunk` (after a chunk of
//! rows is written), `shard` (after a finished shard is hashed and journaled), `manifest` (every
//! file hashed, manifest not yet written) and `rename` (just before the output is renamed into
//! place). Without the variable a point costs one relaxed atomic load.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

/// The configured point and the remaining count before it fires.
struct Armed {
    point: String,
    remaining: AtomicUsize,
}

fn armed() -> Option<&'static Armed> {
    static ARMED: OnceLock<Option<Armed>> = OnceLock::new();
    ARMED
        .get_or_init(|| {
            let spec = std::env::var("MIXQ_FAULT").ok().filter(|s| !s.is_empty())?;
            let (point, nth) = match spec.split_once(':') {
                Some((p, n)) => (p.to_string(), n.parse::<usize>().unwrap_or(1).max(1)),
                None => (spec, 1),
            };
            Some(Armed { point, remaining: AtomicUsize::new(nth) })
        })
        .as_ref()
}

/// Reaches the crash point `name`: kills the process if `MIXQ_FAULT` names it and its count is up.
pub fn point(name: &str) {
    let Some(a) = armed() else { return };
    if a.point == name && a.remaining.fetch_sub(1, Ordering::SeqCst) == 1 {
        // SAFETY: kill(2) on our own pid with a constant signal has no memory-safety preconditions.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
    }
}
