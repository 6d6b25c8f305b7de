//! `mixq inspect`: what a checkpoint holds.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use mixq_loader::Checkpoint;

use crate::args::Json;
use crate::report::{self, print_json};

/// Arguments of `mixq inspect`.
#[derive(clap::Args)]
#[command(after_help = "Example:\n  mixq inspect gpt-oss-120b-mlx-3.6bit\n\nA flag's default is shown as [default: ...] or in its help.")]
pub struct InspectArgs {
    /// Checkpoint folder.
    dir: PathBuf,
    #[command(flatten)]
    json: Json,
}

/// Runs `mixq inspect`.
pub fn run(a: InspectArgs) -> Result<ExitCode> {
    let i = mixq_quantizer::writer::inspect::inspect(&Checkpoint::open(&a.dir)?)?;
    let name = a.dir.display().to_string();
    if a.json.json {
        print_json(&report::inspect_json(&name, &i));
    } else {
        print!("{}", report::inspect_text(&name, &i));
    }
    Ok(ExitCode::SUCCESS)
}
