//! Timing shared by the bench binaries.

use std::time::Instant;

/// Timed repetitions; the best is kept (the machine is shared).
pub const REPEATS: usize = 3;

/// Seconds of the fastest of [`REPEATS`] runs of `f`.
pub fn best_of(mut f: impl FnMut()) -> f64 {
    (0..REPEATS)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}
