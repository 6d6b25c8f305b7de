//! `mixq logits`: float32 logits of a list of token ids, written as .npy.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use mixq_loader::Checkpoint;
use mixq_runtime::jobs::{read_token_ids, write_logits};

use crate::args::Json;
use crate::backend::{self, BackendArgs};
use crate::report::print_json;

/// Arguments of `mixq logits`.
#[derive(clap::Args)]
#[command(after_help = "Example:\n  echo '[1, 2, 3]' > t.json && mixq logits --model /tmp/tiny --tokens t.json --out l.npy\n\nA flag's default is shown as [default: ...] or in its help.")]
pub struct LogitsArgs {
    /// Checkpoint folder (upstream, transformers' dense fine-tune, or converted).
    #[arg(long)]
    model: PathBuf,
    /// JSON file holding a list of token ids.
    #[arg(long)]
    tokens: PathBuf,
    /// Output .npy file.
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    backend: BackendArgs,
    #[command(flatten)]
    threads: crate::args::Threads,
    #[command(flatten)]
    quiet: crate::args::Quiet,
    #[command(flatten)]
    json: Json,
}

/// Runs `mixq logits`.
pub fn run(a: LogitsArgs) -> Result<ExitCode> {
    let ids = read_token_ids(&a.tokens)?;
    let ckpt = Checkpoint::open(&a.model)?;
    let m = backend::load(&ckpt, &a.backend, a.json.json, a.quiet.quiet)?;
    let (secs, vocab) = a.threads.pool()?.install(|| write_logits(&m, &ids, &a.out))?;
    if a.json.json {
        print_json(&serde_json::json!({"out": a.out, "tokens": ids.len(), "vocab": vocab, "seconds": secs, "backend": m.backend()}));
    } else {
        println!("wrote {} ([{}, {vocab}] float32) in {secs:.2}s", a.out.display(), ids.len());
    }
    Ok(ExitCode::SUCCESS)
}
