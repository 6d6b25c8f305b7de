//! `cargo bench --bench validate`: validation throughput of `mixq validate` on the bundled trained
//! model and its held-out text, next to mlx-lm computing the same perplexity on the CPU in the
//! same run (`benches/mlx_perplexity.py`, default mlx-lm path, batches of 8 windows).
//!
//! Not a test: it prints figures. Set `MIXQ_PYTHON` to a python with mlx and mlx-lm (default
//! `.venv/bin/python`).

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

/// Window length (the trained model's evaluation setting).
const CTX: usize = 256;
/// Tokens evaluated.
const TOKENS: usize = 16384;

fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let model = root.join("models/tiny-gpt-oss-shakespeare");
    let text = root.join("models/shakespeare-dev.txt");
    let t = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_mixq"))
        .args(["validate", "--json", "--quiet", "--ctx", &CTX.to_string(), "--max-tokens", &TOKENS.to_string(), "--model"])
        .arg(&model)
        .arg("--text")
        .arg(&text)
        .output()
        .expect("mixq runs");
    let secs = t.elapsed().as_secs_f64();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let scored = v["tokens"].as_u64().unwrap_or(0) as f64;
    let mixq_tps = scored / secs;
    println!("== validation benchmark: trained tiny model, {TOKENS} tokens of shakespeare-dev.txt, windows of {CTX} ==");
    println!("mixq validate : ppl {:.4}, {scored} tokens in {secs:.2}s (whole process) = {mixq_tps:.0} tokens/s", v["ppl"].as_f64().unwrap_or(0.0));
    let python = std::env::var("MIXQ_PYTHON").map(PathBuf::from).unwrap_or_else(|_| root.join(".venv/bin/python"));
    if !python.exists() {
        println!("mlx-lm skipped: python {} not found (set MIXQ_PYTHON)", python.display());
        return;
    }
    let out = Command::new(&python)
        .arg(root.join("benches/mlx_perplexity.py"))
        .arg(&model)
        .arg(&text)
        .args([CTX.to_string(), TOKENS.to_string()])
        .output()
        .expect("python runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    match stdout.lines().find_map(|l| l.strip_prefix("MIXQ_BENCH_JSON ")) {
        Some(line) => {
            let m: serde_json::Value = serde_json::from_str(line).expect("JSON");
            let tps = m["tokens_per_second"].as_f64().unwrap_or(0.0);
            println!("mlx-lm        : ppl {:.4}, {} tokens = {tps:.0} tokens/s (scoring loop only)", m["ppl"].as_f64().unwrap_or(0.0), m["tokens"]);
            println!("ratio         : {:.2}x (target >= 1.5x)", mixq_tps / tps);
        }
        None => println!("mlx-lm failed: {}", String::from_utf8_lossy(&out.stderr)),
    }
}
