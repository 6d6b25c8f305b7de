//! `cargo bench --bench runtime`: prefill and decode speed of mixq's CPU runtime next to mlx-lm's
//! (default quantized path, same converted model, same machine, same run), and decode's achieved
//! weight bandwidth against this machine's measured streaming-read bandwidth.
//!
//! Not a test: it prints figures. Models: the `medium` synthetic checkpoint (about 1 GB upstream)
//! and the bundled trained model, both converted with `gpt-oss-120b-3.6bit`. Set `MIXQ_PYTHON`
//! to a python with mlx and mlx-lm (default `.venv/bin/python`); without it only mixq is measured.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use mixq_loader::Checkpoint;
use mixq_runtime::Model;
use rayon::prelude::*;

/// Prompt length for the prefill figure.
const PROMPT_TOKENS: usize = 512;
/// Tokens decoded for the decode figure.
const DECODE_TOKENS: usize = 128;
/// Recipe the models are converted with.
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

/// Streaming-read bandwidth of this machine in bytes/s: two threads summing a 1 GiB buffer.
fn memory_bandwidth() -> f64 {
    let words = (1usize << 30) / 8;
    let buf: Vec<u64> = (0..words as u64).collect();
    let mut best = 0f64;
    for _ in 0..5 {
        let t = Instant::now();
        let sum: u64 = buf.par_chunks(1 << 16).map(|c| c.iter().fold(0u64, |a, &b| a.wrapping_add(b))).reduce(|| 0, u64::wrapping_add);
        let secs = t.elapsed().as_secs_f64();
        std::hint::black_box(sum);
        best = best.max((words * 8) as f64 / secs);
    }
    best
}

/// mixq's prefill and decode tokens/s on a model.
fn mixq_speed(dir: &Path) -> (f64, f64, usize) {
    let ckpt = Checkpoint::open(dir).expect("converted model opens");
    let model = Model::load(&ckpt).expect("model loads");
    let vocab = model.config.vocab_size as u64;
    let mut x = 12345u64;
    let prompt: Vec<u32> = (0..PROMPT_TOKENS)
        .map(|_| {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (1 + (x >> 33) % (vocab - 1)) as u32
        })
        .collect();
    // Warm-up.
    let mut cache = model.new_cache();
    model.forward(&prompt[..8], &mut cache, false).expect("forward");
    let mut cache = model.new_cache();
    let t = Instant::now();
    let logits = model.forward(&prompt, &mut cache, false).expect("prefill");
    let prefill = PROMPT_TOKENS as f64 / t.elapsed().as_secs_f64();
    let mut token = mixq_runtime::sample::argmax(&logits);
    let t = Instant::now();
    for _ in 0..DECODE_TOKENS {
        let logits = model.forward(&[token], &mut cache, false).expect("decode");
        token = mixq_runtime::sample::argmax(&logits);
    }
    let decode = DECODE_TOKENS as f64 / t.elapsed().as_secs_f64();
    (prefill, decode, model.bytes_per_token())
}

/// mlx-lm's prefill and decode tokens/s over `prompt` and `decode` tokens, or why it could not
/// be measured.
fn mlx_speed(dir: &Path, prompt: usize, decode: usize) -> Result<(f64, f64), String> {
    let python = std::env::var("MIXQ_PYTHON").map(PathBuf::from).unwrap_or_else(|_| root().join(".venv/bin/python"));
    if !python.exists() {
        return Err(format!("python {} not found (set MIXQ_PYTHON)", python.display()));
    }
    let out = Command::new(&python)
        .arg(root().join("benches/mlx_generate.py"))
        .arg(dir)
        .args([prompt.to_string(), decode.to_string()])
        .output()
        .map_err(|e| e.to_string())?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("MIXQ_BENCH_JSON "))
        .ok_or_else(|| format!("mlx-lm failed: {}", String::from_utf8_lossy(&out.stderr)))?;
    let v: serde_json::Value = serde_json::from_str(line).map_err(|e| e.to_string())?;
    Ok((v["prefill_tps"].as_f64().unwrap_or(0.0), v["decode_tps"].as_f64().unwrap_or(0.0)))
}

fn main() {
    let data = root().join("target/bench-data");
    std::fs::create_dir_all(&data).expect("bench data folder");
    let medium_src = data.join("medium-src");
    if !medium_src.join("config.json").exists() {
        let shape = mixq_synth::Shape::preset("medium").expect("preset");
        mixq_synth::write_checkpoint(&medium_src, &shape).expect("synthetic checkpoint");
    }
    // mlx-lm's CPU path for quantized experts runs at about half a token per second on the
    // medium model, so there it is timed over fewer tokens (its rate per token barely depends on
    // the count); the trained model gets the full counts.
    let models = [
        ("medium synthetic, 3.6-bit", medium_src, data.join("runtime-medium-3.6bit"), (32, 8)),
        (
            "trained tiny, 3.6-bit",
            root().join("models/tiny-gpt-oss-shakespeare"),
            data.join("runtime-trained-3.6bit"),
            (PROMPT_TOKENS, DECODE_TOKENS),
        ),
    ];
    let bandwidth = memory_bandwidth();
    println!("== runtime benchmark: prefill {PROMPT_TOKENS} tokens, decode {DECODE_TOKENS} tokens, CPU, {} threads ==", rayon::current_num_threads());
    println!("measured streaming-read bandwidth: {:.2} GB/s\n", bandwidth / 1e9);
    println!(
        "{:<28} {:>14} {:>14} {:>14} {:>14} {:>8} {:>12} {:>8}",
        "model", "mixq prefill", "mlx prefill", "mixq decode", "mlx decode", "ratio", "weight GB/s", "% of bw"
    );
    for (name, src, out, (mlx_prompt, mlx_decode)) in models {
        ensure_converted(&src, &out);
        let (prefill, decode, bytes_per_token) = mixq_speed(&out);
        let mlx = mlx_speed(&out, mlx_prompt, mlx_decode);
        let achieved = bytes_per_token as f64 * decode;
        let (mp, md, ratio) = match &mlx {
            Ok((p, d)) => (format!("{p:.1}"), format!("{d:.1}"), format!("{:.2}x", decode / d)),
            Err(_) => ("-".into(), "-".into(), "-".into()),
        };
        println!(
            "{:<28} {:>10.1} t/s {:>10} t/s {:>10.1} t/s {:>10} t/s {:>8} {:>12.2} {:>7.1}%",
            name,
            prefill,
            mp,
            decode,
            md,
            ratio,
            achieved / 1e9,
            100.0 * achieved / bandwidth
        );
        println!(
            "    ({:.1} MB of packed weights read per decoded token; mlx-lm timed over {mlx_prompt} prompt and {mlx_decode} decoded tokens)",
            bytes_per_token as f64 / 1e6
        );
        if let Err(why) = mlx {
            println!("    mlx-lm skipped: {why}");
        }
    }
    println!("\ntargets: decode >= 1.5x mlx-lm and >= 50% of the measured bandwidth");
}
