//! `mixq run`: generation with streamed text and closing figures, on the CPU or the GPU, from a
//! checkpoint or from synthetic weights of a config's shape.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Result};
use mixq_loader::Checkpoint;
use mixq_runtime::jobs::{peak_rss_bytes, prompt_ids, weight_bandwidth};
use mixq_runtime::{Engine, GenerationStats, SamplerConfig, TextCodec};
use serde_json::{json, Value};

use crate::backend::{self, BackendArgs};
use crate::report::print_json;

/// Arguments of `mixq run`.
#[derive(clap::Args)]
#[command(after_help = "Example:\n  mixq run --model gpt-oss-120b-mlx-3.6bit --chat --prompt \"Explain MXFP4\" --max-tokens 200\n  mixq run --model /tmp/tiny --prompt \"ROMEO:\" --temp 0.8 --top-p 0.95 --seed 7\n\nA flag's default is shown as [default: ...] or in its help.")]
#[command(mut_arg("json", |a| a.help("Print one JSON object (text, tokens, figures) instead of streaming")))]
pub struct RunCommandArgs {
    /// Checkpoint folder (upstream, transformers' dense fine-tune, or converted).
    #[arg(long, required_unless_present = "synthetic_config", conflicts_with = "synthetic_config")]
    model: Option<PathBuf>,
    /// The prompt.
    #[arg(long, required_unless_present = "prompt_tokens")]
    prompt: Option<String>,
    /// Use N deterministic pseudo-random token ids as the prompt (for timing).
    #[arg(long, conflicts_with = "prompt", value_parser = crate::args::at_least_1)]
    prompt_tokens: Option<usize>,
    /// Time a model of this config.json's shape with random weights made in GPU memory
    /// (no checkpoint file); needs --recipe.
    #[arg(long, requires = "recipe")]
    synthetic_config: Option<PathBuf>,
    /// Recipe that quantizes the synthetic model.
    #[arg(long, requires = "synthetic_config")]
    recipe: Option<String>,
    /// Add (or replace) this run's prefill and decode rows in the "Speed and memory" table of the model's card
    /// (MODEL/README.md), refreshing its entry in mixq-manifest.json.
    #[arg(long, requires = "model")]
    bench: bool,
    /// Keep generating past end-of-sequence tokens.
    #[arg(long)]
    ignore_eos: bool,
    /// Wrap the prompt in the model's chat template (harmony format for gpt-oss).
    #[arg(long)]
    chat: bool,
    /// Tokens to generate at most.
    #[arg(long, default_value_t = 100, value_parser = crate::args::at_least_1)]
    max_tokens: usize,
    /// Sampling temperature, 0 or more; 0 is greedy.
    #[arg(long, default_value_t = 0.0, value_parser = crate::args::non_negative, allow_hyphen_values = true)]
    temp: f32,
    /// Nucleus sampling mass, above 0 and at most 1 (1 keeps every token).
    #[arg(long, default_value_t = 1.0, value_parser = crate::args::probability_mass, allow_hyphen_values = true)]
    top_p: f32,
    /// Keep only the k most likely tokens (0 keeps all).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// RNG seed for sampling.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[command(flatten)]
    backend: BackendArgs,
    #[command(flatten)]
    threads: crate::args::Threads,
    #[command(flatten)]
    quiet: crate::args::Quiet,
    #[command(flatten)]
    json: crate::args::Json,
}

/// Runs `mixq run`.
pub fn run(a: RunCommandArgs) -> Result<ExitCode> {
    let source = match (&a.model, &a.synthetic_config, &a.recipe) {
        (Some(m), _, _) => Source::Checkpoint(m),
        (None, Some(config), Some(recipe)) => Source::Synthetic { config, recipe },
        _ => bail!("give --model DIR, or --synthetic-config CONFIG with --recipe R"),
    };
    let args = RunArgs {
        source,
        prompt: a.prompt.as_deref(),
        prompt_tokens: a.prompt_tokens,
        chat: a.chat,
        max_tokens: a.max_tokens,
        sampler: SamplerConfig { temperature: a.temp, top_p: a.top_p, top_k: a.top_k, seed: a.seed },
        ignore_eos: a.ignore_eos,
        backend: a.backend,
        stream: !a.json.json,
        quiet: a.quiet.quiet,
    };
    // On a worker of the pool, so the products' parallel loops do not hand each piece of work
    // from this thread to the pool and back (a hundred thread switches per decoded token).
    let figures = a.threads.pool()?.install(|| generate_text(&args))?;
    if a.json.json {
        print_json(&figures);
    }
    if let (true, Some(dir)) = (a.bench, &a.model) {
        let card = dir.join("README.md");
        mixq_validate::card::write_bench_rows(&card, "run", &bench_rows(&figures))?;
        if !a.quiet.quiet {
            eprintln!("added this run's speed and memory to {}", card.display());
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The card's prefill and decode rows from a run's figures.
fn bench_rows(f: &Value) -> Vec<mixq_validate::card::BenchRow> {
    let n = |k: &str| f[k].as_u64().unwrap_or(0);
    let x = |k: &str| f[k].as_f64().unwrap_or(0.0);
    let row = |measured: &str, tokens: &str, rate: &str, weights: Option<f64>| mixq_validate::card::BenchRow {
        measured: measured.to_string(),
        device: f["device"].as_str().unwrap_or_default().to_string(),
        tokens: n(tokens) as usize,
        tokens_per_second: x(rate),
        weight_bytes_per_second: weights,
        peak_rss: f["peak_rss_bytes"].as_u64(),
        gpu_memory: n("gpu_memory_bytes"),
    };
    vec![
        row("`mixq run` prefill", "prompt_tokens", "prefill_tokens_per_second", None),
        row("`mixq run` decode", "generated_tokens", "decode_tokens_per_second", Some(x("weight_bytes_per_second"))),
    ]
}

/// Where the model comes from.
pub enum Source<'a> {
    /// A checkpoint folder (upstream, transformers' dense fine-tune, or converted).
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
    pub sampler: SamplerConfig,
    pub ignore_eos: bool,
    pub backend: BackendArgs,
    pub stream: bool,
    /// No notes or progress on stderr.
    pub quiet: bool,
}

/// Loads the engine (and, for a checkpoint, its tokenizer) that `a` asks for.
fn load_engine<'c>(a: &RunArgs<'_>, ckpt: Option<&'c Checkpoint>) -> Result<(Engine<'c>, Option<TextCodec>)> {
    match (&a.source, ckpt) {
        (Source::Checkpoint(dir), Some(ckpt)) => Ok((backend::load(ckpt, &a.backend, !a.stream, a.quiet)?, Some(TextCodec::load(dir)?))),
        (Source::Synthetic { config, recipe }, _) => {
            if a.backend.backend == mixq_runtime::Backend::Cpu {
                bail!("--synthetic-config makes its weights in GPU memory: it needs --backend gpu or auto");
            }
            Ok((backend::synthetic(config, recipe, a.quiet || !a.stream, a.backend.verbose)?, None))
        }
        _ => unreachable!("a checkpoint source always has an open checkpoint"),
    }
}

/// Generates from a prompt; with `stream`, prints the text as it comes and the figures at the end.
/// Returns the text, tokens and figures as JSON.
pub fn generate_text(a: &RunArgs<'_>) -> Result<Value> {
    let ckpt = match a.source {
        Source::Checkpoint(dir) => Some(Checkpoint::open(dir)?),
        Source::Synthetic { .. } => None,
    };
    let (engine, codec) = load_engine(a, ckpt.as_ref())?;
    let (ids, shown_prompt) = prompt_ids(a.prompt_tokens, a.prompt, a.chat, codec.as_ref(), engine.config().vocab_size)?;
    let eos: Vec<u32> = match (&codec, a.ignore_eos) {
        (Some(c), false) => c.eos_ids.clone(),
        _ => Vec::new(),
    };
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
    let shown_ids = if a.prompt_tokens.is_some() { Value::Null } else { json!(ids) };
    let peak = peak_rss_bytes();
    let figures = figures_json(&engine, &stats, peak, (&shown_prompt, &output), &tokens, shown_ids);
    if a.stream {
        if output.len() > shown {
            print!("{}", &output[shown..]);
        }
        print_figures(&engine, &stats, peak);
    }
    Ok(figures)
}

/// The text, tokens and figures of a run as JSON.
fn figures_json(engine: &Engine<'_>, stats: &GenerationStats, peak: Option<u64>, (prompt, text): (&str, &str), tokens: &[u32], prompt_ids: Value) -> Value {
    json!({
        "prompt": prompt,
        "text": text,
        "tokens": tokens,
        "prompt_ids": prompt_ids,
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
        "weight_bytes_per_token": engine.bytes_per_token(),
        "weight_bytes_per_second": weight_bandwidth(engine, stats),
    })
}

/// The closing figures after streamed text.
fn print_figures(engine: &Engine<'_>, stats: &GenerationStats, peak: Option<u64>) {
    println!("\n==========");
    println!("Backend: {}", engine.describe());
    println!("Prompt: {} tokens, {:.1} tokens/s", stats.prompt_tokens, stats.prefill_tps());
    println!(
        "Generation: {} tokens, {:.1} tokens/s ({:.2} GB/s of weights)",
        stats.generated_tokens,
        stats.decode_tps(),
        weight_bandwidth(engine, stats) / 1e9
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
