//! `mixq verify`: a converted checkpoint against its manifest, index and config.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;

use crate::args::Json;
use crate::report::{self, print_json};

/// Arguments of `mixq verify`.
#[derive(clap::Args)]
#[command(after_help = "Example:\n  mixq verify gpt-oss-120b-mlx-3.6bit\n\nA flag's default is shown as [default: ...] or in its help.")]
pub struct VerifyArgs {
    /// Converted checkpoint folder.
    dir: PathBuf,
    #[command(flatten)]
    json: Json,
    /// Print nothing when the model verifies (the exit status says it); the problems otherwise.
    #[arg(long)]
    quiet: bool,
}

/// Runs `mixq verify`; exits 1 on any mismatch.
pub fn run(a: VerifyArgs) -> Result<ExitCode> {
    let r = mixq_quantizer::writer::verify::verify(&a.dir);
    let name = a.dir.display().to_string();
    if a.json.json {
        print_json(&report::verify_json(&name, &r));
    } else if !(a.quiet && r.ok()) {
        print!("{}", report::verify_text(&name, &r));
    }
    Ok(if r.ok() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}
