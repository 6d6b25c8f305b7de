//! `cargo bench --bench runtime`: the CPU runtime's prefill and decode against references timed
//! in the same process, on one thread (a rayon pool of 1) and on all cores.
//!
//! - Prefill (as `validate` runs it: logits for every position) in GFLOP/s of its matrix
//!   products, against `matrixmultiply::sgemm` on the same shapes with the weights already
//!   dequantized to f32 (dense layers and lm_head with every token, each expert with its share
//!   of the tokens, as if routing were uniform; attention's own products are left out of both).
//! - Decode in bytes of packed weights read per second (the bytes one token reads, times tokens
//!   per second), against a streaming read of that many bytes.
//!
//! - The one-token kernel alone on 3-bit codes held in cache (no memory traffic): what the vector
//!   units allow, on one thread and on all cores (whether the cores share them shows here).
//!
//! Not a test: it prints figures. Model: the `medium` synthetic checkpoint (8 layers, hidden 1024,
//! 32 experts top-4) converted with `gpt-oss-120b-3.6bit`.

use std::path::{Path, PathBuf};
use std::process::Command;

use mixq_loader::{Checkpoint, FloatDtype, RowMap};
use mixq_runtime::matrix::{Codes, Matrix};
use mixq_runtime::Model;
use rayon::prelude::*;
use timing::best_of;

mod timing;

/// Prompt length for the prefill figure (one CPU prefill chunk).
const PROMPT_TOKENS: usize = 512;
/// Tokens decoded for the decode figure.
const DECODE_TOKENS: usize = 32;
/// Recipe the model is converted with.
const RECIPE: &str = "gpt-oss-120b-3.6bit";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Converts `src` into `out` with the mixq CLI unless already there.
fn ensure_converted(src: &Path, out: &Path) {
    if out.join("mixq-manifest.json").exists() {
        return;
    }
    let status = Command::new(env!("CARGO_BIN_EXE_mixq"))
        .args(["convert", "--recipe", RECIPE, "--force", "--quiet", "--source"])
        .arg(src)
        .arg("--out")
        .arg(out)
        .status()
        .expect("mixq runs");
    assert!(status.success(), "conversion of {} failed", src.display());
}

/// A product `[m, k] x [k, n]`: `m` tokens through a weight of `n` rows and `k` columns, `count`
/// times with distinct weights (one per expert).
#[derive(Clone, Copy)]
struct Shape {
    m: usize,
    k: usize,
    n: usize,
    count: usize,
}

/// The matrix products of one prefill of `tokens` tokens with logits for every position: those
/// of one layer (repeated per layer) and lm_head's.
fn prefill_shapes(model: &Model<'_>, tokens: usize) -> (Vec<Shape>, Shape) {
    let c = &model.config;
    let (h, i, hd) = (c.hidden_size, c.intermediate_size, c.head_dim);
    let (q, kv) = (c.num_attention_heads * hd, c.num_key_value_heads * hd);
    let per_expert = tokens * c.num_experts_per_tok / c.num_local_experts;
    let mut layer: Vec<Shape> = [(h, q), (h, kv), (h, kv), (q, h), (h, c.num_local_experts)]
        .into_iter()
        .map(|(k, n)| Shape { m: tokens, k, n, count: 1 })
        .collect();
    layer.push(Shape { m: per_expert, k: h, n: i, count: 2 * c.num_local_experts });
    layer.push(Shape { m: per_expert, k: i, n: h, count: c.num_local_experts });
    (layer, Shape { m: tokens, k: h, n: c.vocab_size, count: 1 })
}

/// Multiply-adds of `shapes`, times two.
fn flops(shapes: &[Shape]) -> f64 {
    shapes.iter().map(|s| 2.0 * (s.m * s.k * s.n * s.count) as f64).sum()
}

/// Seconds `matrixmultiply::sgemm` takes for `shapes` on the current rayon pool: f32 weights
/// already in memory (one distinct buffer per expert, so they come from memory as the runtime's
/// do), output columns split over threads in blocks of 64.
fn sgemm_seconds(shapes: &[Shape]) -> f64 {
    let mut seconds = 0.0;
    for s in shapes {
        let x: Vec<f32> = (0..s.m * s.k).map(|j| (j as f32 * 0.1).sin()).collect();
        let ws: Vec<Vec<f32>> = (0..s.count).map(|e| (0..s.k * s.n).map(|j| ((j + e) as f32 * 0.01).cos()).collect()).collect();
        let mut ys: Vec<Vec<f32>> = vec![vec![0f32; s.m * s.n]; s.count];
        seconds += best_of(|| {
            for (w, y) in ws.iter().zip(ys.iter_mut()) {
                sgemm_split(s, &x, w, y);
            }
        });
        std::hint::black_box(&ys);
    }
    seconds
}

/// `y[m, n] = x[m, k] w[n, k]^T` with output columns in parallel blocks.
fn sgemm_split(s: &Shape, x: &[f32], w: &[f32], y: &mut [f32]) {
    const BLOCK: usize = 64;
    let blocks: Vec<(usize, Vec<f32>)> = (0..s.n.div_ceil(BLOCK))
        .into_par_iter()
        .map(|b| {
            let (lo, hi) = (b * BLOCK, (b * BLOCK + BLOCK).min(s.n));
            let mut tile = vec![0f32; s.m * (hi - lo)];
            // SAFETY: x is [m, k] row-major, w's rows lo..hi are [hi - lo, k] row-major (read as
            // its transpose through the strides), tile is [m, hi - lo]; all in bounds.
            unsafe {
                matrixmultiply::sgemm(
                    s.m,
                    s.k,
                    hi - lo,
                    1.0,
                    x.as_ptr(),
                    s.k as isize,
                    1,
                    w[lo * s.k..].as_ptr(),
                    1,
                    s.k as isize,
                    0.0,
                    tile.as_mut_ptr(),
                    (hi - lo) as isize,
                    1,
                );
            }
            (lo, tile)
        })
        .collect();
    for (lo, tile) in blocks {
        let width = tile.len() / s.m.max(1);
        for (row, t) in y.chunks_exact_mut(s.n).zip(tile.chunks_exact(width.max(1))) {
            row[lo..lo + width].copy_from_slice(t);
        }
    }
}

/// Streaming-read bandwidth in bytes/s over a buffer of `bytes` bytes on the current pool.
fn stream_read(bytes: usize) -> f64 {
    let words = bytes / 8;
    let buf: Vec<u64> = (0..words as u64).collect();
    let secs = best_of(|| {
        let sum: u64 = buf.par_chunks(1 << 16).map(|c| c.iter().fold(0u64, |a, &b| a.wrapping_add(b))).reduce(|| 0, u64::wrapping_add);
        std::hint::black_box(sum);
    });
    (words * 8) as f64 / secs
}

/// Bytes per second of codes, scales and biases that one-token products read from 3-bit, group-64
/// BF16 matrices of 512 x 2048 (about 400 KB, so each stays in its core's cache), with `threads`
/// threads each running its own products on its own matrix (no work shared between them).
fn kernel_in_cache(threads: usize) -> f64 {
    let (rows, cols, group) = (512, 2048, 64);
    let weight: Vec<u8> = (0..rows * cols * 3 / 8).map(|i| (i * 37 % 251) as u8).collect();
    let floats: Vec<u8> = (0..rows * cols / group).flat_map(|i| (0x3c00u16 + (i % 64) as u16).to_le_bytes()).collect();
    let x: Vec<f32> = (0..cols).map(|i| (i as f32 * 0.37).sin()).collect();
    const PRODUCTS: usize = 1000;
    let secs = best_of(|| {
        std::thread::scope(|scope| {
            for _ in 0..threads {
                let (weight, floats, x) = (weight.clone(), floats.clone(), &x);
                scope.spawn(move || {
                    let m = Matrix {
                        codes: Codes::Affine { weight: &weight, scales: &floats, biases: &floats, floats: FloatDtype::BF16, bits: 3, group_size: group },
                        rows,
                        cols,
                        map: RowMap::identity(rows),
                    };
                    let mut y = vec![0f32; rows];
                    let alone = rayon::ThreadPoolBuilder::new().num_threads(1).build().expect("thread pool");
                    alone.install(|| {
                        for _ in 0..PRODUCTS {
                            m.matmul(std::hint::black_box(x), &mut y);
                        }
                    });
                    std::hint::black_box(&y);
                });
            }
        });
    });
    let bytes = weight.len() + 2 * floats.len();
    (threads * PRODUCTS * bytes) as f64 / secs
}

/// Fixed pseudo-random token ids.
fn prompt(vocab: usize) -> Vec<u32> {
    let mut x = 12345u64;
    (0..PROMPT_TOKENS)
        .map(|_| {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (1 + (x >> 33) % (vocab as u64 - 1)) as u32
        })
        .collect()
}

/// Prefill seconds (all logits) and decode tokens/s on the current pool (each the best of
/// [`timing::REPEATS`] runs; every decode run starts from the same 64-token cache).
fn runtime_speed(model: &Model<'_>) -> (f64, f64) {
    let prompt = prompt(model.config.vocab_size);
    let mut cache = model.new_cache();
    model.forward(&prompt[..8], &mut cache, false).expect("warm-up");
    let prefill = best_of(|| {
        let mut cache = model.new_cache();
        std::hint::black_box(model.forward(&prompt, &mut cache, true).expect("prefill"));
    });
    let mut cache = model.new_cache();
    let logits = model.forward(&prompt[..64], &mut cache, false).expect("prefill");
    let start = mixq_runtime::sample::argmax(&logits);
    let decode = best_of(|| {
        let mut cache = cache.clone();
        let mut token = start;
        for _ in 0..DECODE_TOKENS {
            let logits = model.forward(&[token], &mut cache, false).expect("decode");
            token = mixq_runtime::sample::argmax(&logits);
        }
    });
    (prefill, DECODE_TOKENS as f64 / decode)
}

fn main() {
    let data = root().join("target/bench-data");
    std::fs::create_dir_all(&data).expect("bench data folder");
    let src = data.join("medium-src");
    if !src.join("config.json").exists() {
        let shape = mixq_synth::Shape::preset("medium").expect("preset");
        mixq_synth::write_checkpoint(&src, &shape).expect("synthetic checkpoint");
    }
    let out = data.join("runtime-medium-3.6bit");
    ensure_converted(&src, &out);
    let ckpt = Checkpoint::open(&out).expect("converted model opens");
    let model = Model::load(&ckpt).expect("model loads");
    let (layer, head) = prefill_shapes(&model, PROMPT_TOKENS);
    let layers = model.config.num_hidden_layers as f64;
    let work = layers * flops(&layer) + flops(&[head]);
    let bytes = model.bytes_per_token();
    let all = rayon::current_num_threads();
    println!("== runtime benchmark: medium synthetic, {RECIPE}; prefill {PROMPT_TOKENS} tokens (all logits), decode {DECODE_TOKENS} tokens ==");
    println!("prefill: {:.1} GFLOP of matrix products; decode: {:.1} MB of packed weights per token\n", work / 1e9, bytes as f64 / 1e6);
    println!(
        "{:<8} {:>14} {:>14} {:>8} {:>11} {:>12} {:>12} {:>8}",
        "threads", "prefill GF/s", "sgemm GF/s", "ratio", "decode t/s", "weight GB/s", "stream GB/s", "ratio"
    );
    for threads in [1, all] {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("thread pool");
        let (prefill, decode, sgemm, stream) = pool.install(|| {
            let (prefill, decode) = runtime_speed(&model);
            (prefill, decode, layers * sgemm_seconds(&layer) + sgemm_seconds(&[head]), stream_read(bytes))
        });
        let (ours, reference) = (work / prefill / 1e9, work / sgemm / 1e9);
        let weights = bytes as f64 * decode;
        println!(
            "{:<8} {:>14.1} {:>14.1} {:>7.0}% {:>11.1} {:>12.2} {:>12.2} {:>7.0}%",
            threads,
            ours,
            reference,
            100.0 * ours / reference,
            decode,
            weights / 1e9,
            stream / 1e9,
            100.0 * weights / stream
        );
    }
    println!("\ngoals: prefill >= 50% of sgemm's GFLOP/s, decode >= 50% of the streaming read");
    println!("\none-token kernel, 3-bit 512 x 2048 per thread held in cache (the vector units' limit):");
    let in_cache: Vec<(usize, f64)> = [1, all].into_iter().map(|threads| (threads, kernel_in_cache(threads))).collect();
    for (threads, rate) in &in_cache {
        println!("  {threads} thread(s): {:.2} GB/s ({:.2}x one thread)", rate / 1e9, rate / in_cache[0].1);
    }
}
