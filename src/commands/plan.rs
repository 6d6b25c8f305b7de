//! `mixq plan`: size and bits per weight of a recipe on a model, from config.json alone.

use std::process::ExitCode;

use anyhow::Result;

use crate::args::{Json, Quiet};
use crate::report::{self, print_json};

/// Arguments of `mixq plan`.
#[derive(clap::Args)]
#[command(after_help = "Example:\n  mixq plan --source openai/gpt-oss-120b --recipe gpt-oss-120b-3.6bit\n\nA flag's default is shown as [default: ...] or in its help.")]
#[command(mut_arg("json", |a| a.help("Print one JSON object instead of the table")))]
pub struct PlanArgs {
    /// Checkpoint folder, hub repo id (owner/name) or a bare config.json.
    #[arg(long)]
    source: String,
    /// Recipe name (see `mixq recipes`) or path to a YAML file.
    #[arg(long)]
    recipe: String,
    #[command(flatten)]
    quiet: Quiet,
    #[command(flatten)]
    json: Json,
}

/// Runs `mixq plan`.
pub fn run(a: PlanArgs) -> Result<ExitCode> {
    let plan = mixq_quantizer::writer::jobs::plan_source(&a.source, &a.recipe, !a.quiet.quiet)?;
    for w in &plan.unused_rules {
        eprintln!("warning: {w}");
    }
    if a.json.json {
        print_json(&report::plan_json(&a.source, &plan));
    } else {
        print!("{}", report::plan_text(&a.source, &plan));
    }
    Ok(ExitCode::SUCCESS)
}
