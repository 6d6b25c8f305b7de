//! `mixq synth`: a deterministic synthetic checkpoint, upstream or transformers dense layout.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use mixq_loader::{FloatDtype, GptOssConfig, SourceLayout};

use crate::args::Json;
use crate::report::print_json;

/// Arguments of `mixq synth`.
#[derive(clap::Args)]
#[command(after_help = "Example:\n  mixq synth --preset small --out /tmp/small-src\n  mixq synth --preset small --dense bf16 --out /tmp/small-finetune\n\nA flag's default is shown as [default: ...] or in its help.")]
pub struct SynthArgs {
    /// Output folder.
    #[arg(long)]
    out: PathBuf,
    /// Shape preset: tiny, small, wide, medium.
    #[arg(long, default_value = "tiny", conflicts_with = "config")]
    preset: String,
    /// Take the shape from a real model's config.json instead (full size: gpt-oss-20b's is
    /// about 13 GB).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Override the layer count (default: the preset's or the config's).
    #[arg(long, value_parser = crate::args::at_least_1)]
    layers: Option<usize>,
    /// Override the model width (default: the preset's or the config's).
    #[arg(long, value_parser = crate::args::at_least_1)]
    hidden: Option<usize>,
    /// Override the expert width (default: the preset's or the config's).
    #[arg(long, value_parser = crate::args::at_least_1)]
    intermediate: Option<usize>,
    /// Override the expert count (default: the preset's or the config's).
    #[arg(long, value_parser = crate::args::at_least_1)]
    experts: Option<usize>,
    /// Override the RNG seed (default: the preset's or the config's).
    #[arg(long)]
    seed: Option<u64>,
    /// Write `rope_scaling.truncate: false` in the config.
    #[arg(long)]
    no_truncate: bool,
    /// Write transformers' dense layout of a fine-tune in this float type instead of the
    /// upstream MXFP4 layout (dense experts are 2.7 times larger in bf16).
    #[arg(long, value_enum)]
    dense: Option<DenseFloat>,
    #[command(flatten)]
    json: Json,
}

/// The float type of a dense synthetic checkpoint.
#[derive(Clone, Copy, clap::ValueEnum)]
enum DenseFloat {
    Bf16,
    F16,
    F32,
}

/// Runs `mixq synth`.
pub fn run(a: SynthArgs) -> Result<ExitCode> {
    let mut shape = match &a.config {
        Some(path) => mixq_synth::Shape::from_config(&GptOssConfig::from_file(path)?, 1),
        None => mixq_synth::Shape::preset(&a.preset)
            .with_context(|| format!("unknown preset {}; expected tiny, small, wide or medium", a.preset))?,
    };
    shape.layers = a.layers.unwrap_or(shape.layers);
    shape.hidden = a.hidden.unwrap_or(shape.hidden);
    shape.intermediate = a.intermediate.unwrap_or(shape.intermediate);
    shape.experts = a.experts.unwrap_or(shape.experts);
    shape.seed = a.seed.unwrap_or(shape.seed);
    shape.truncate = shape.truncate && !a.no_truncate;
    let layout = match a.dense {
        None => SourceLayout::Mxfp4,
        Some(DenseFloat::Bf16) => SourceLayout::Dense(FloatDtype::BF16),
        Some(DenseFloat::F16) => SourceLayout::Dense(FloatDtype::F16),
        Some(DenseFloat::F32) => SourceLayout::Dense(FloatDtype::F32),
    };
    mixq_synth::write_checkpoint_as(&a.out, &shape, layout)?;
    if a.json.json {
        print_json(&serde_json::json!({"out": a.out, "preset": a.preset, "config": shape.config_json()}));
    } else {
        println!("wrote {}", a.out.display());
    }
    Ok(ExitCode::SUCCESS)
}
