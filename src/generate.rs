//! `mixq run`: generation with streamed text and closing figures, on the CPU or the GPU, from a
//! checkpoint or from synthetic weights of a config's shape.

use std::path::Path;

use anyhow::{bail, Result};
use mixq_loader::Checkpoint;

use crate::backend::{self, BackendArgs};

/// Peak resident memory of this process in bytes, where the OS reports it.
fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Where the model comes from.
pub enum Source<'a> {
    /// A checkpoint folder (upstream or converted).
    Checkpoint(&'a Path),
    /// Random weights in GPU memory: a config.json and a recipe.
    Synthetic { config: &'a Path, recipe: &'a str },
}

/// What `mixq run` was asked to do.
pub struct RunArgs<'a> {
    pub source: Source<'a>,
    pub prompt: Option<&'a str>,
    /// Use this many deterministic pseudo-random token ids as the prompt instead of text.
    pub prompt_tokens: Option<usize>,
    pub chat: bool,
    pub max_tokens: usize,
    pub sampler: mixq_runtime::SamplerConfig,
    pub ignore_eos: bool,
    pub backend: BackendArgs,
    pub stream: bool,
}

/// Deterministic token ids in `1..vocab`, for timing runs.
fn pseudo_random_ids(n: usize, vocab: usize) -> Vec<u32> {
    let mut x = 12345u64;
    (0..n)
        .map(|_| {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (1 + (x >> 33) % (vocab as u64 - 1).max(1)) as u32
        })
        .collect()
}

/// Generates from a prompt; with `stream`, prints the text as it comes and the figures at the end.
/// Returns the text, tokens and figures as JSON.
pub fn generate_text(a: &RunArgs<'_>) -> Result<serde_json::Value> {
    let ckpt = match a.source {
        Source::Checkpoint(dir) => Some(Checkpoint::open(dir)?),
        Source::Synthetic { .. } => None,
    };
    let (engine, codec) = match (&a.source, &ckpt) {
        (Source::Checkpoint(dir), Some(ckpt)) => (backend::load(ckpt, &a.backend, !a.stream)?, Some(mixq_runtime::TextCodec::load(dir)?)),
        (Source::Synthetic { config, recipe }, _) => {
            if a.backend.backend == mixq_runtime::Backend::Cpu {
                bail!("--synthetic-config makes its weights in GPU memory: it needs --backend gpu or auto");
            }
            (backend::synthetic(config, recipe, !a.stream)?, None)
        }
        _ => unreachable!("a checkpoint source always has an open checkpoint"),
    };
    let vocab = engine.config().vocab_size;
    let (ids, shown_prompt) = match (a.prompt_tokens, a.prompt, &codec) {
        (Some(n), _, _) => (pseudo_random_ids(n, vocab), format!("[{n} pseudo-random prompt tokens]")),
        (None, Some(p), Some(codec)) => {
            let text = if a.chat { codec.render_chat(&[("user", p)])? } else { p.to_string() };
            (codec.encode(&text)?, p.to_string())
        }
        (None, Some(_), None) => {
            bail!("synthetic models have no tokenizer: give --prompt-tokens N instead of --prompt")
        }
        (None, None, _) => bail!("give --prompt TEXT or --prompt-tokens N"),
    };
    let eos: Vec<u32> = match (&codec, a.ignore_eos) {
        (Some(c), false) => c.eos_ids.clone(),
        _ => Vec::new(),
    };
    use std::io::Write;
    let mut shown = 0;
    let mut generated = Vec::new();
    let mut stdout = std::io::stdout();
    if a.stream {
        print!("{shown_prompt}");
    }
    let (tokens, stats) = engine.generate(&ids, a.max_tokens, a.sampler, &eos, a.backend.max_context, |id| {
        generated.push(id);
        if let (true, Some(codec)) = (a.stream, &codec) {
            if let Ok(t) = codec.decode(&generated) {
                // Print only what is new and complete (a partial UTF-8 sequence decodes to U+FFFD).
                if t.len() > shown && !t.ends_with('\u{fffd}') {
                    print!("{}", &t[shown..]);
                    let _ = stdout.flush();
                    shown = t.len();
                }
            }
        }
    })?;
    let output = match &codec {
        Some(c) => c.decode(&tokens)?,
        None => String::new(),
    };
    let peak = peak_rss_bytes();
    let bytes_per_token = engine.bytes_per_token();
    let bandwidth = bytes_per_token as f64 * stats.decode_tps();
    let figures = serde_json::json!({
        "prompt": shown_prompt,
        "text": output,
        "tokens": tokens,
        "prompt_ids": if a.prompt_tokens.is_some() { serde_json::Value::Null } else { serde_json::json!(ids) },
        "prompt_tokens": stats.prompt_tokens,
        "generated_tokens": stats.generated_tokens,
        "prefill_tokens_per_second": stats.prefill_tps(),
        "decode_tokens_per_second": stats.decode_tps(),
        "kv_cache_bytes": stats.cache_bytes,
        "peak_rss_bytes": peak,
        "stopped_at_eos": stats.stopped_at_eos,
        "backend": engine.backend(),
        "device": engine.describe(),
        "gpu_memory_bytes": engine.gpu_memory_bytes(),
        "weight_bytes_per_token": bytes_per_token,
        "weight_bytes_per_second": bandwidth,
    });
    if a.stream {
        if output.len() > shown {
            print!("{}", &output[shown..]);
        }
        println!("\n==========");
        println!("Backend: {}", engine.describe());
        println!("Prompt: {} tokens, {:.1} tokens/s", stats.prompt_tokens, stats.prefill_tps());
        println!(
            "Generation: {} tokens, {:.1} tokens/s ({:.2} GB/s of weights)",
            stats.generated_tokens,
            stats.decode_tps(),
            bandwidth / 1e9
        );
        let gpu = engine.gpu_memory_bytes();
        println!(
            "{}: {:.2} MiB; peak memory: {}{}",
            if engine.backend() == "gpu" { "KV cache and activations" } else { "KV cache" },
            stats.cache_bytes as f64 / 1048576.0,
            peak.map(|b| format!("{:.1} MiB", b as f64 / 1048576.0)).unwrap_or_else(|| "unknown".into()),
            if gpu > 0 { format!("; GPU memory: {:.1} MiB", gpu as f64 / 1048576.0) } else { String::new() }
        );
    }
    Ok(figures)
}
