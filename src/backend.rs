//! Choosing and loading the backend for `run`, `logits` and `validate`: the `--backend` flags,
//! the upload progress bar, and the one-line note when `auto` falls back to the CPU.

use std::io::IsTerminal;
use std::path::Path;

use anyhow::{Context, Result};
use mixq_loader::{Checkpoint, GptOssConfig};
use mixq_runtime::gpu::GpuOptions;
use mixq_runtime::jobs::synthetic_gpu_engine;
use mixq_runtime::{Backend, Engine};

/// The backend flags shared by the commands that run a model.
#[derive(clap::Args, Debug, Clone)]
pub struct BackendArgs {
    /// Where the model runs: cpu, gpu (wgpu: Metal on macOS, Vulkan on Linux; software adapters
    /// included), or auto (a hardware GPU when there is one, else the CPU).
    #[arg(long, default_value = "auto", value_parser = parse_backend)]
    pub backend: Backend,
    /// GPU KV-cache size in tokens (default: what the command needs).
    #[arg(long)]
    pub max_context: Option<usize>,
}

fn parse_backend(s: &str) -> Result<Backend, String> {
    s.parse()
}

/// Upload progress on stderr: a bar on a terminal, nothing otherwise.
fn upload_bar(quiet: bool) -> Option<indicatif::ProgressBar> {
    (!quiet && std::io::stderr().is_terminal()).then(|| {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template("uploading weights {wide_bar} {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}")
                .expect("valid template"),
        );
        bar
    })
}

/// Loads a checkpoint on the chosen backend.
pub fn load<'a>(ckpt: &'a Checkpoint, args: &BackendArgs, quiet: bool) -> Result<Engine<'a>> {
    let bar = upload_bar(quiet);
    let (engine, choice) = Engine::load(ckpt, args.backend, &GpuOptions::default(), &|done, total| {
        if let Some(b) = &bar {
            b.set_length(total);
            b.set_position(done);
        }
    })
    .with_context(|| format!("loading {} on the {:?} backend", ckpt.dir().display(), args.backend).to_lowercase())?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    if let Some(why) = choice.fallback {
        eprintln!("note: running on the CPU ({why})");
    }
    Ok(engine)
}

/// A model of `config`'s shape quantized by `recipe`, with random weights made in GPU memory.
pub fn synthetic(config_path: &Path, recipe: &str, quiet: bool) -> Result<Engine<'static>> {
    let config = GptOssConfig::from_file(config_path)?;
    let recipe = mixq_quantizer::Recipe::load(recipe)?;
    let alloc = mixq_quantizer::Allocation::resolve(&config, &recipe)?;
    let config = mixq_quantizer::writer::converted_config::converted_config(&config, &alloc)?;
    let bar = upload_bar(quiet);
    let total = alloc.summary().bytes as u64;
    let done = std::sync::atomic::AtomicU64::new(0);
    let engine = synthetic_gpu_engine(&config, &|n| {
        let d = done.fetch_add(n, std::sync::atomic::Ordering::Relaxed) + n;
        if let Some(b) = &bar {
            b.set_length(total);
            b.set_position(d);
        }
    })?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    Ok(engine)
}
