//! Pieces of the `run` and `logits` jobs: prompt ids, synthetic GPU models, logits files, and
//! the figures printed after a run.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use mixq_loader::GptOssConfig;

use crate::gpu::{GpuContext, GpuModel, GpuOptions};
use crate::{Engine, GenerationStats, RuntimeError, TextCodec};

/// Anything that stops a `logits` job.
#[derive(Debug, thiserror::Error)]
pub enum LogitsJobError {
    /// The token file could not be read.
    #[error("reading {0}")]
    Read(PathBuf, #[source] std::io::Error),
    /// The token file is not a JSON list of ids.
    #[error("{0}: expected a JSON list of non-negative token ids")]
    Tokens(PathBuf, #[source] serde_json::Error),
    /// The model failed to run.
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    /// The .npy file could not be written.
    #[error("writing {0}")]
    Write(PathBuf, #[source] std::io::Error),
}

/// Reads a JSON list of token ids.
pub fn read_token_ids(path: &Path) -> Result<Vec<u32>, LogitsJobError> {
    let text = std::fs::read_to_string(path).map_err(|e| LogitsJobError::Read(path.to_path_buf(), e))?;
    serde_json::from_str(&text).map_err(|e| LogitsJobError::Tokens(path.to_path_buf(), e))
}

/// Writes `engine`'s float32 logits of `ids` to `out` as .npy; returns (seconds, vocab).
pub fn write_logits(engine: &Engine<'_>, ids: &[u32], out: &Path) -> Result<(f64, usize), LogitsJobError> {
    let start = std::time::Instant::now();
    let logits = engine.logits(ids)?;
    let secs = start.elapsed().as_secs_f64();
    let vocab = engine.config().vocab_size;
    std::fs::write(out, crate::npy::npy_f32(&[ids.len(), vocab], &logits)).map_err(|e| LogitsJobError::Write(out.to_path_buf(), e))?;
    Ok((secs, vocab))
}

/// Deterministic token ids in `1..vocab`, for timing runs.
pub fn pseudo_random_ids(n: usize, vocab: usize) -> Vec<u32> {
    let mut x = 12345u64;
    (0..n)
        .map(|_| {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (1 + (x >> 33) % (vocab as u64 - 1).max(1)) as u32
        })
        .collect()
}

/// The prompt's ids and how to show it: `prompt_tokens` pseudo-random ids, or `prompt` encoded
/// (in the chat template with `chat`) by `codec`.
pub fn prompt_ids(
    prompt_tokens: Option<usize>,
    prompt: Option<&str>,
    chat: bool,
    codec: Option<&TextCodec>,
    vocab: usize,
) -> Result<(Vec<u32>, String), RuntimeError> {
    match (prompt_tokens, prompt, codec) {
        (Some(n), _, _) => Ok((pseudo_random_ids(n, vocab), format!("[{n} pseudo-random prompt tokens]"))),
        (None, Some(p), Some(codec)) => {
            let text = if chat { codec.render_chat(&[("user", p)])? } else { p.to_string() };
            Ok((codec.encode(&text)?, p.to_string()))
        }
        (None, Some(_), None) => {
            Err(RuntimeError::Text("synthetic models have no tokenizer: give --prompt-tokens N instead of --prompt".into()))
        }
        (None, None, _) => Err(RuntimeError::Text("give --prompt TEXT or --prompt-tokens N".into())),
    }
}

/// Peak resident memory of this process in bytes, where the OS reports it.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Weight bytes read per second of decoding.
pub fn weight_bandwidth(engine: &Engine<'_>, stats: &GenerationStats) -> f64 {
    engine.bytes_per_token() as f64 * stats.decode_tps()
}

/// A model of `config`'s shape with random weights made in GPU memory (software adapters allowed);
/// `progress(bytes)` as each weight is made.
pub fn synthetic_gpu_engine(config: &GptOssConfig, progress: &dyn Fn(u64)) -> Result<Engine<'static>, RuntimeError> {
    let ctx = Arc::new(GpuContext::new(&GpuOptions { allow_software: true, ..Default::default() })?);
    Ok(Engine::from_gpu(GpuModel::synthetic(config, ctx, progress)?))
}
