//! Flags shared by several commands, flattened into each command's arguments. Where a command
//! words a flag's help differently, it sets that help with `mut_arg` on its variant.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use mixq_quantizer::QuantMethod;

/// `--threads N`, for the commands that compute.
#[derive(clap::Args, Debug, Clone)]
pub struct Threads {
    /// Worker threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
}

impl Threads {
    /// A pool of `threads` workers (default: one per core) for a job's rayon work.
    pub fn pool(&self) -> Result<rayon::ThreadPool> {
        rayon::ThreadPoolBuilder::new().num_threads(self.threads.unwrap_or(0)).build().context("starting worker threads")
    }
}

/// `--quiet`, for the commands that report progress.
#[derive(clap::Args, Debug, Clone)]
pub struct Quiet {
    /// No progress output.
    #[arg(long)]
    pub quiet: bool,
}

/// `--json`, which every command takes.
#[derive(clap::Args, Debug, Clone)]
pub struct Json {
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// `--out FILE` and `--force`, for the commands that write one output.
#[derive(clap::Args, Debug, Clone)]
pub struct OutFile {
    /// The file to write.
    #[arg(long)]
    pub out: PathBuf,
    /// Replace an existing file.
    #[arg(long)]
    pub force: bool,
}

impl OutFile {
    /// Refuses to replace an existing output file without `--force`.
    pub fn refuse_existing(&self) -> Result<()> {
        refuse_existing(&self.out, self.force)
    }
}

/// Refuses to replace an existing `out` without `force`.
pub fn refuse_existing(out: &Path, force: bool) -> Result<()> {
    if out.exists() && !force {
        bail!("{}: exists; pass --force to replace it", out.display());
    }
    Ok(())
}

/// Parses `--quantizer`.
pub fn parse_quantizer(s: &str) -> Result<QuantMethod, String> {
    QuantMethod::parse(s).ok_or_else(|| format!("expected minmax, mse or gptq, not {s:?}"))
}
