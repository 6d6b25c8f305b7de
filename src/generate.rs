//! `mixq run`: generation with streamed text and closing figures.

use std::path::Path;

use anyhow::Result;
use mixq_loader::Checkpoint;

/// Peak resident memory of this process in bytes, where the OS reports it.
fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Generates from a prompt; with `stream`, prints the text as it comes and the figures at the end.
/// Returns the text, tokens and figures as JSON.
pub fn generate_text(
    model_dir: &Path,
    prompt: &str,
    chat: bool,
    max_tokens: usize,
    sampler: mixq_runtime::SamplerConfig,
    stream: bool,
) -> Result<serde_json::Value> {
    use std::io::Write;
    let ckpt = Checkpoint::open(model_dir)?;
    let model = mixq_runtime::Model::load(&ckpt)?;
    let codec = mixq_runtime::TextCodec::load(model_dir)?;
    let text = if chat { codec.render_chat(&[("user", prompt)])? } else { prompt.to_string() };
    let ids = codec.encode(&text)?;
    let mut shown = 0;
    let mut generated = Vec::new();
    let mut stdout = std::io::stdout();
    if stream {
        print!("{prompt}");
    }
    let (tokens, stats) = mixq_runtime::generate(
        &model,
        &ids,
        max_tokens,
        &mut mixq_runtime::Sampler::new(sampler),
        &codec.eos_ids,
        |id| {
            generated.push(id);
            if stream {
                if let Ok(t) = codec.decode(&generated) {
                    // Print only what is new and complete (a partial UTF-8 sequence decodes to U+FFFD).
                    if t.len() > shown && !t.ends_with('\u{fffd}') {
                        print!("{}", &t[shown..]);
                        let _ = stdout.flush();
                        shown = t.len();
                    }
                }
            }
        },
    )?;
    let output = codec.decode(&tokens)?;
    let peak = peak_rss_bytes();
    let figures = serde_json::json!({
        "prompt": prompt,
        "text": output,
        "tokens": tokens,
        "prompt_ids": ids,
        "prompt_tokens": stats.prompt_tokens,
        "generated_tokens": stats.generated_tokens,
        "prefill_tokens_per_second": stats.prefill_tps(),
        "decode_tokens_per_second": stats.decode_tps(),
        "kv_cache_bytes": stats.cache_bytes,
        "peak_rss_bytes": peak,
        "stopped_at_eos": stats.stopped_at_eos,
    });
    if stream {
        if output.len() > shown {
            print!("{}", &output[shown..]);
        }
        println!("\n==========");
        println!("Prompt: {} tokens, {:.1} tokens/s", stats.prompt_tokens, stats.prefill_tps());
        println!("Generation: {} tokens, {:.1} tokens/s", stats.generated_tokens, stats.decode_tps());
        println!(
            "KV cache: {:.2} MiB; peak memory: {}",
            stats.cache_bytes as f64 / 1048576.0,
            peak.map(|b| format!("{:.1} MiB", b as f64 / 1048576.0)).unwrap_or_else(|| "unknown".into())
        );
    }
    Ok(figures)
}

