//! Generation: prefill the prompt, then decode one token at a time until eos or the limit.

use std::time::Instant;

use crate::error::{Result, RuntimeError};
use crate::model::Model;
use crate::sample::Sampler;

/// Timings and sizes of one generation.
#[derive(Debug, Clone, Default)]
pub struct GenerationStats {
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Generated tokens.
    pub generated_tokens: usize,
    /// Seconds spent on the prompt (through the first sampled token).
    pub prefill_seconds: f64,
    /// Seconds spent decoding the rest.
    pub decode_seconds: f64,
    /// Bytes held by the KV cache at the end.
    pub cache_bytes: usize,
    /// Whether an eos token ended generation.
    pub stopped_at_eos: bool,
}

impl GenerationStats {
    /// Prompt tokens per second.
    pub fn prefill_tps(&self) -> f64 {
        self.prompt_tokens as f64 / self.prefill_seconds.max(1e-9)
    }

    /// Decoded tokens per second (after the first).
    pub fn decode_tps(&self) -> f64 {
        self.generated_tokens.saturating_sub(1) as f64 / self.decode_seconds.max(1e-9)
    }
}

/// The error for an empty prompt: generation needs at least one token to start from.
pub(crate) fn require_prompt(prompt: &[u32]) -> Result<()> {
    if prompt.is_empty() {
        return Err(RuntimeError::Text("the prompt is empty: gpt-oss has no BOS token to start from".into()));
    }
    Ok(())
}

/// Prefill, then decode one token at a time until eos or `max_tokens`, on any backend:
/// `step(tokens)` runs `tokens` after the context so far and returns the next token. Fills every
/// figure of the stats except `cache_bytes`.
pub(crate) fn decode_loop(
    prompt: &[u32],
    max_tokens: usize,
    eos_ids: &[u32],
    mut on_token: impl FnMut(u32),
    mut step: impl FnMut(&[u32]) -> Result<u32>,
) -> Result<(Vec<u32>, GenerationStats)> {
    let mut stats = GenerationStats { prompt_tokens: prompt.len(), ..Default::default() };
    let mut out = Vec::new();
    let start = Instant::now();
    if max_tokens > 0 {
        let mut next = step(prompt)?;
        stats.prefill_seconds = start.elapsed().as_secs_f64();
        let decode_start = Instant::now();
        loop {
            out.push(next);
            on_token(next);
            if eos_ids.contains(&next) {
                stats.stopped_at_eos = true;
                break;
            }
            if out.len() >= max_tokens {
                break;
            }
            next = step(&[next])?;
        }
        stats.decode_seconds = decode_start.elapsed().as_secs_f64();
    }
    stats.generated_tokens = out.len();
    Ok((out, stats))
}

/// Generates up to `max_tokens` after `prompt`, calling `on_token` with each new id.
pub fn generate(
    model: &Model<'_>,
    prompt: &[u32],
    max_tokens: usize,
    sampler: &mut Sampler,
    eos_ids: &[u32],
    on_token: impl FnMut(u32),
) -> Result<(Vec<u32>, GenerationStats)> {
    require_prompt(prompt)?;
    if prompt.len() + max_tokens > model.max_context() {
        return Err(RuntimeError::ContextExceeded { tokens: prompt.len() + max_tokens, context: model.max_context() });
    }
    let mut cache = model.new_cache();
    let (out, mut stats) =
        decode_loop(prompt, max_tokens, eos_ids, on_token, |tokens| Ok(sampler.sample(&model.forward(tokens, &mut cache, false)?)))?;
    stats.cache_bytes = cache.bytes();
    Ok((out, stats))
}
