//! mixq: turn gpt-oss checkpoints into mixed-precision MLX models and prove they are still good.
//!
//! Each command's arguments and its one function live in `commands/`; this file names the
//! commands (their one-line help) and dispatches.

mod args;
mod backend;
mod commands;
mod progress;
mod report;
mod signals;

use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

use commands::*;

#[derive(Parser)]
#[command(name = "mixq", version, about = "Mixed-precision MLX conversion of gpt-oss checkpoints")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Size and bits per weight of a recipe applied to a model, from config.json alone.
    Plan(plan::PlanArgs),
    /// Convert an upstream gpt-oss checkpoint to an MLX checkpoint following a recipe.
    Convert(convert::ConvertArgs),
    /// Run a model over calibration text and record the mean x² of every quantizable linear
    /// layer's input channels (per expert for experts), for `convert --calibration`.
    Calibrate(calibrate::CalibrateArgs),
    /// For every unit a recipe can address (class x layer), the cost of quantizing it alone at
    /// each bits x group size, and its size: the input of `mixq recipe search`.
    Sensitivity(sensitivity::SensitivityArgs),
    /// Recipe authoring.
    Recipe {
        #[command(subcommand)]
        command: RecipeCommand,
    },
    /// What a checkpoint (upstream or MLX) holds: format, tensors by class, quantization, size, BPW.
    Inspect(inspect::InspectArgs),
    /// Check a converted checkpoint against its manifest, index and config; exit 1 on any mismatch.
    Verify(verify::VerifyArgs),
    /// Verify a converted model, then upload it to a hub repo (HF_ENDPOINT, HF_TOKEN).
    Publish(publish::PublishArgs),
    /// Generate text with a model, streaming it; ends with prefill/decode tokens/s and peak memory.
    Run(run::RunCommandArgs),
    /// Float32 logits `[n_tokens, vocab]` of a JSON list of token ids, written as .npy.
    Logits(logits::LogitsArgs),
    /// Perplexity of a model on a text; with a reference also KL, top-1 agreement and PPL ratio.
    /// Exits 1 when a gate fails.
    Validate(validate::ValidateArgs),
    /// List the GPU adapters the GPU backend can use, best first (what `--backend auto` picks from).
    Adapters(adapters::AdaptersArgs),
    /// List the built-in recipes.
    Recipes(recipes::RecipesArgs),
    /// The pipeline on the bundled tiny model: plan, calibrate, convert, inspect, verify, generate, validate.
    Demo(demo::DemoArgs),
    /// Write a deterministic synthetic upstream-layout checkpoint (for tests and benches).
    Synth(synth::SynthArgs),
}

#[derive(Subcommand)]
enum RecipeCommand {
    /// The recipe with the least predicted KL under a size budget, from a sensitivity file.
    Search(recipe_search::SearchArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    signals::install();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs the command's one function.
fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Plan(a) => plan::run(a),
        Command::Convert(a) => convert::run(a),
        Command::Calibrate(a) => calibrate::run(a),
        Command::Sensitivity(a) => sensitivity::run(a),
        Command::Recipe { command: RecipeCommand::Search(a) } => recipe_search::run(a),
        Command::Inspect(a) => inspect::run(a),
        Command::Verify(a) => verify::run(a),
        Command::Publish(a) => publish::run(a),
        Command::Run(a) => run::run(a),
        Command::Logits(a) => logits::run(a),
        Command::Validate(a) => validate::run(a),
        Command::Adapters(a) => adapters::run(a),
        Command::Recipes(a) => recipes::run(a),
        Command::Demo(a) => demo::run(a),
        Command::Synth(a) => synth::run(a),
    }
}
