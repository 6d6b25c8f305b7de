//! `cargo bench --bench attention`: the CPU runtime's attention alone at a long context, as
//! prefill meets it late in a validation run: one chunk of new tokens on top of a cache that
//! already holds thousands of positions, on a full causal layer and a sliding-window one.
//!
//! Figures are seconds (fastest of a few runs) and GFLOP/s of attention's own products (`q·k`
//! and the weighted sum of values: 4 flops per head dimension per visible query-key pair), on
//! one thread (a rayon pool of 1) and on all cores. Random queries, keys and values: attention's
//! cost does not depend on them. Not a test: it prints figures.

mod timing;

use timing::best_of;

use mixq_runtime::attention::{attend, AttentionShape};
use mixq_runtime::cache::LayerCache;

/// New tokens (one CPU prefill chunk).
const NEW_TOKENS: usize = 512;
/// Positions already cached before them.
const CACHED_TOKENS: usize = 3584;
/// gpt-oss's sliding window.
const WINDOW: usize = 128;

/// Fixed pseudo-random values in [-1, 1).
fn numbers(len: usize, seed: u64) -> Vec<f32> {
    let mut x = seed;
    (0..len)
        .map(|_| {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (x >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

/// Query-key pairs the new tokens attend over.
fn visible_pairs(window: Option<usize>) -> usize {
    (CACHED_TOKENS..CACHED_TOKENS + NEW_TOKENS).map(|pos| window.map_or(pos + 1, |w| w.min(pos + 1))).sum()
}

fn main() {
    let all = rayon::current_num_threads();
    println!("== attention benchmark: {NEW_TOKENS} new tokens after {CACHED_TOKENS} cached, head_dim 64 ==");
    println!("{:<26} {:<10} {:>8} {:>10} {:>8}", "heads (query/kv)", "layer", "threads", "seconds", "GFLOP/s");
    for (name, heads, kv_heads) in [("bench model (16/4)", 16, 4), ("gpt-oss-120b (64/8)", 64, 8)] {
        for window in [None, Some(WINDOW)] {
            let shape = AttentionShape { heads, kv_heads, head_dim: 64, window };
            let width = kv_heads * shape.head_dim;
            let total = CACHED_TOKENS + NEW_TOKENS;
            // As the model sizes it: a ring of the window plus one chunk on sliding layers.
            let mut cache = LayerCache::new(width, window.map(|w| w + NEW_TOKENS));
            cache.append(0, &numbers(total * width, 1), &numbers(total * width, 2));
            let queries = numbers(NEW_TOKENS * heads * shape.head_dim, 3);
            let sinks = numbers(heads, 4);
            let flops = 4.0 * (visible_pairs(window) * heads * shape.head_dim) as f64;
            for threads in [1, all] {
                let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("thread pool");
                let seconds = pool.install(|| best_of(|| drop(std::hint::black_box(attend(shape, &queries, &cache, CACHED_TOKENS, &sinks)))));
                let layer = if window.is_some() { "sliding" } else { "full" };
                println!("{name:<26} {layer:<10} {threads:>8} {seconds:>10.4} {:>8.1}", flops / seconds / 1e9);
            }
        }
    }
}
