//! Flags shared by several commands, flattened into each command's arguments. Where a command
//! words a flag's help differently, it sets that help with `mut_arg` on its variant.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use mixq_loader::format::AFFINE_BITS;
use mixq_quantizer::QuantMethod;

/// `--threads N`, for the commands that compute.
#[derive(clap::Args, Debug, Clone)]
pub struct Threads {
    /// Worker threads, at least 1 (default: all cores).
    #[arg(long, value_parser = at_least_1)]
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
    /// Nothing on stderr but warnings and errors: no progress, notes or summaries.
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

/// A whole number of at least 1 (`--threads`, token counts, window lengths).
pub fn at_least_1(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!("expected a whole number of at least 1, not {s:?}")),
    }
}

/// A finite number `>= 0` (`--temp`).
pub fn non_negative(s: &str) -> Result<f32, String> {
    match s.trim().parse::<f32>() {
        Ok(x) if x.is_finite() && x >= 0.0 => Ok(x),
        _ => Err(format!("expected a number of 0 or more (0 = greedy), not {s:?}")),
    }
}

/// A probability mass in (0, 1] (`--top-p`).
pub fn probability_mass(s: &str) -> Result<f32, String> {
    match s.trim().parse::<f32>() {
        Ok(x) if x > 0.0 && x <= 1.0 => Ok(x),
        _ => Err(format!("expected a fraction above 0 and at most 1 (1 keeps every token), not {s:?}")),
    }
}

/// A finite positive number (`--target-bpw`).
pub fn positive(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(x) if x.is_finite() && x > 0.0 => Ok(x),
        _ => Err(format!("expected a positive number, not {s:?}")),
    }
}

/// The smallest `--max-shard-bytes`: below it a checkpoint becomes hundreds of shards.
pub const MIN_SHARD_BYTES: u64 = 64 * 1024;

/// A shard size: a byte count or a size with a unit (`2GiB`, case-insensitive), at least 64 KiB.
pub fn shard_bytes(s: &str) -> Result<u64, String> {
    let n = mixq_quantizer::authoring::recipe_search::parse_size(s)
        .ok_or_else(|| format!("expected a size such as 5GiB or 2000000000 (units in any case), not {s:?}"))?;
    if n < MIN_SHARD_BYTES {
        return Err(format!("{s} is below the smallest shard size, {MIN_SHARD_BYTES} bytes (64 KiB); mlx-lm writes 5 GiB shards"));
    }
    Ok(n)
}

/// A hub repo id, `owner/name`.
pub fn repo_id(s: &str) -> Result<String, String> {
    if mixq_loader::source::looks_like_repo_id(s) {
        Ok(s.to_string())
    } else {
        Err(format!("expected a hub repo id such as openai/gpt-oss-120b (owner/name), not {s:?}"))
    }
}

/// An affine bit width mlx supports (`--min-bits`).
pub fn bit_width(s: &str) -> Result<u32, String> {
    match s.trim().parse::<u32>() {
        Ok(b) if AFFINE_BITS.contains(&b) => Ok(b),
        _ => {
            let widths: Vec<String> = AFFINE_BITS.iter().map(u32::to_string).collect();
            Err(format!("expected one of {}, not {s:?}", widths.join(", ")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numeric_flags_are_range_checked() {
        assert!(at_least_1("0").is_err() && at_least_1("-2").is_err() && at_least_1("3") == Ok(3));
        assert!(non_negative("-1").is_err() && non_negative("nan").is_err() && non_negative("0") == Ok(0.0));
        assert!(probability_mass("5").is_err() && probability_mass("0").is_err() && probability_mass("0.95") == Ok(0.95));
        assert!(positive("0").is_err() && positive("inf").is_err() && positive("3.6") == Ok(3.6));
        assert!(shard_bytes("0").is_err() && shard_bytes("100").is_err());
        assert_eq!(shard_bytes("5gib"), Ok(5 << 30));
        assert_eq!(shard_bytes("200000"), Ok(200000));
        assert!(bit_width("7").is_err() && bit_width("3") == Ok(3));
    }
}
