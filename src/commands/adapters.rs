//! `mixq adapters`: the GPU adapters the GPU backend can use.

use std::process::ExitCode;

use anyhow::Result;

use crate::args::Json;
use crate::report::print_json;

/// Arguments of `mixq adapters`.
#[derive(clap::Args)]
#[command(after_help = "Example:\n  mixq adapters --json\n\nA flag's default is shown as [default: ...] or in its help.")]
pub struct AdaptersArgs {
    #[command(flatten)]
    json: Json,
    /// Show what the GPU drivers print while they are probed (the Vulkan loader's messages, such
    /// as `XDG_RUNTIME_DIR is invalid`); hidden by default.
    #[arg(long)]
    verbose: bool,
}

/// Runs `mixq adapters`.
pub fn run(a: AdaptersArgs) -> Result<ExitCode> {
    let mute = crate::backend::ProbeMute::new(!a.verbose);
    let all = mixq_runtime::gpu::adapters();
    mute.release();
    if a.json.json {
        print_json(&serde_json::json!(all
            .iter()
            .map(|a| serde_json::json!({"name": a.name, "backend": a.backend, "driver": a.driver, "software": a.software}))
            .collect::<Vec<_>>()));
    } else if all.is_empty() {
        println!("no GPU adapters (the GPU backend needs Vulkan, Metal or DX12)");
    } else {
        for a in all {
            println!("{a}{}", if a.software { "  [software: used by --backend gpu, not by auto]" } else { "" });
        }
    }
    Ok(ExitCode::SUCCESS)
}
