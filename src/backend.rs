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
    /// GPU KV-cache size in tokens, at least 1 (default: what the command needs).
    #[arg(long, value_parser = crate::args::at_least_1)]
    pub max_context: Option<usize>,
    /// Show what the GPU drivers print while mixq looks for an adapter (the Vulkan loader's
    /// messages, such as `XDG_RUNTIME_DIR is invalid`); hidden by default.
    #[arg(long)]
    pub verbose: bool,
}

/// Stderr sent to /dev/null until dropped: keeps the drivers' probing messages off a run's
/// output (they write to the file descriptor directly, not through Rust).
struct MutedStderr {
    saved: libc::c_int,
}

impl MutedStderr {
    /// Mutes stderr, or does nothing (returns `None`) when it cannot.
    fn new() -> Option<Self> {
        use std::os::fd::AsRawFd;
        let null = std::fs::OpenOptions::new().write(true).open("/dev/null").ok()?;
        // SAFETY: dup and dup2 on open descriptors; the saved copy of fd 2 is put back in drop.
        unsafe {
            let saved = libc::dup(2);
            if saved < 0 {
                return None;
            }
            if libc::dup2(null.as_raw_fd(), 2) < 0 {
                libc::close(saved);
                return None;
            }
            Some(MutedStderr { saved })
        }
    }
}

impl Drop for MutedStderr {
    fn drop(&mut self) {
        // SAFETY: `saved` is the descriptor dup'ed in `new`, still open.
        unsafe {
            libc::dup2(self.saved, 2);
            libc::close(self.saved);
        }
    }
}

/// Stderr muted while the GPU drivers are probed for adapters (unless `--verbose`), until
/// `release` or drop: the first progress call of an upload releases it, so errors and bars show.
pub struct ProbeMute(std::sync::Mutex<Option<MutedStderr>>);

impl ProbeMute {
    /// Mutes stderr when `active`.
    pub fn new(active: bool) -> Self {
        ProbeMute(std::sync::Mutex::new(if active { MutedStderr::new() } else { None }))
    }

    /// Puts stderr back; later calls do nothing.
    pub fn release(&self) {
        drop(self.0.lock().unwrap_or_else(|e| e.into_inner()).take());
    }
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

/// Loads a checkpoint on the chosen backend; `no_bar` hides the upload bar, `quiet` (`--quiet`)
/// also the note on a fallback to the CPU.
pub fn load<'a>(ckpt: &'a Checkpoint, args: &BackendArgs, no_bar: bool, quiet: bool) -> Result<Engine<'a>> {
    let bar = upload_bar(no_bar || quiet);
    let mute = ProbeMute::new(!args.verbose && args.backend != mixq_runtime::Backend::Cpu);
    let loaded = Engine::load(ckpt, args.backend, &GpuOptions::default(), &|done, total| {
        mute.release();
        if let Some(b) = &bar {
            b.set_length(total);
            b.set_position(done);
        }
    });
    mute.release();
    let (engine, choice) =
        loaded.with_context(|| format!("loading {} on the {} backend", ckpt.dir().display(), format!("{:?}", args.backend).to_lowercase()))?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    if let (Some(why), false) = (choice.fallback, quiet) {
        eprintln!("note: running on the CPU ({why})");
    }
    Ok(engine)
}

/// A model of `config`'s shape quantized by `recipe`, with random weights made in GPU memory.
pub fn synthetic(config_path: &Path, recipe: &str, quiet: bool, verbose: bool) -> Result<Engine<'static>> {
    let config = GptOssConfig::from_file(config_path)?;
    let recipe = mixq_quantizer::Recipe::load(recipe)?;
    let alloc = mixq_quantizer::Allocation::resolve(&config, &recipe)?;
    let config = mixq_quantizer::writer::converted_config::converted_config(&config, &alloc)?;
    let bar = upload_bar(quiet);
    let total = alloc.summary().bytes as u64;
    let done = std::sync::atomic::AtomicU64::new(0);
    let mute = ProbeMute::new(!verbose);
    let engine = synthetic_gpu_engine(&config, &|n| {
        mute.release();
        let d = done.fetch_add(n, std::sync::atomic::Ordering::Relaxed) + n;
        if let Some(b) = &bar {
            b.set_length(total);
            b.set_position(d);
        }
    });
    mute.release();
    let engine = engine?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    Ok(engine)
}
