//! `mixq validate`: perplexity of a model on a text and, with a reference, KL, top-1 agreement
//! and PPL ratio; exits 1 when a gate fails.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use mixq_validate::validate_job::{validate_model, ValidateRequest, Validation};

use crate::args::{Json, Quiet, Threads};
use crate::backend::{self, BackendArgs};
use crate::progress::CountProgress;
use crate::report::print_json;

/// Arguments of `mixq validate`.
#[derive(clap::Args)]
#[command(after_help = "Example:\n  mixq validate --model /tmp/tiny --reference models/tiny-gpt-oss-shakespeare --text held-out.txt --max-kl 0.02 --min-top1 0.9 --card /tmp/tiny/README.md\n\nA flag's default is shown as [default: ...] or in its help.")]
pub struct ValidateArgs {
    /// The model to measure (converted, upstream, or a transformers dense fine-tune).
    #[arg(long)]
    model: PathBuf,
    /// A UTF-8 text file, tokenized with the model's tokenizer.
    #[arg(long)]
    text: PathBuf,
    /// Reference checkpoint (the source, or another conversion).
    #[arg(long, conflicts_with = "reference_logits")]
    reference: Option<PathBuf>,
    /// Saved reference logits (from --save-reference) instead of a reference model.
    #[arg(long)]
    reference_logits: Option<PathBuf>,
    /// Save the reference's top-k logits (the model's own without --reference) for reuse.
    #[arg(long)]
    save_reference: Option<PathBuf>,
    /// Window length in tokens, at least 2.
    #[arg(long, default_value_t = 512)]
    ctx: usize,
    /// Advance between windows (default: --ctx, non-overlapping).
    #[arg(long)]
    stride: Option<usize>,
    /// Evaluate only the first N tokens of the text (default: all of it).
    #[arg(long, value_parser = crate::args::at_least_1)]
    max_tokens: Option<usize>,
    /// Logits kept per token in a saved reference (at most the vocabulary: larger values are
    /// capped to it).
    #[arg(long, default_value_t = 32)]
    top_k: usize,
    /// Gate: largest acceptable mean KL (default: not checked).
    #[arg(long, allow_hyphen_values = true)]
    max_kl: Option<f64>,
    /// Gate: largest acceptable PPL(model)/PPL(reference) (default: not checked).
    #[arg(long, allow_hyphen_values = true)]
    max_ppl_ratio: Option<f64>,
    /// Gate: smallest acceptable top-1 agreement, a fraction from 0 to 1 (0.9 = 90%; default: not checked).
    #[arg(long, allow_hyphen_values = true)]
    min_top1: Option<f64>,
    /// Add (or replace) a "Validation" section in this model card.
    #[arg(long)]
    card: Option<PathBuf>,
    /// Add (or replace) this run's scoring speed and peak memory in the "Speed and memory" table
    /// of the card (--card, else MODEL/README.md), refreshing its entry in mixq-manifest.json.
    #[arg(long)]
    bench: bool,
    #[command(flatten)]
    backend: BackendArgs,
    #[command(flatten)]
    threads: Threads,
    #[command(flatten)]
    quiet: Quiet,
    #[command(flatten)]
    json: Json,
}

/// Runs `mixq validate`; exits 1 naming each failed gate.
pub fn run(a: ValidateArgs) -> Result<ExitCode> {
    let request = ValidateRequest {
        model: &a.model,
        text: &a.text,
        reference: a.reference.as_deref(),
        reference_logits: a.reference_logits.as_deref(),
        save_reference: a.save_reference.as_deref(),
        ctx: a.ctx,
        stride: a.stride.unwrap_or(a.ctx),
        max_tokens: a.max_tokens,
        top_k: a.top_k,
        gates: mixq_validate::Gates { max_kl: a.max_kl, max_ppl_ratio: a.max_ppl_ratio, min_top1: a.min_top1 },
        card: a.card.as_deref(),
        bench: a.bench,
    };
    let quiet = a.quiet.quiet || a.json.json;
    let pool = a.threads.pool()?;
    let v = pool.install(|| measure(&request, &a.backend, quiet, a.quiet.quiet))?;
    // The figures first: a failed write or gate below must not lose them.
    if a.json.json {
        let mut j = v.summary.to_json();
        j["gates_failed"] = serde_json::json!(v.failed);
        j["gates_passed"] = serde_json::json!(v.passed);
        print_json(&j);
    } else {
        print!("{}", v.summary.to_text());
    }
    for line in v.save(&request)? {
        if !quiet {
            eprintln!("{line}");
        }
    }
    for f in &v.failed {
        eprintln!("gate failed: {f}");
    }
    if !v.failed.is_empty() {
        return Ok(ExitCode::FAILURE);
    }
    if !v.passed.is_empty() && !a.quiet.quiet {
        eprintln!("gates passed: {}", v.passed.join("; "));
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs a validation on `backend`, with progress on stderr unless `no_progress`, and the
/// backend's note unless `quiet`.
pub fn measure(request: &ValidateRequest<'_>, backend: &BackendArgs, no_progress: bool, quiet: bool) -> Result<Validation> {
    let progress = CountProgress::new("validate", "tokens", no_progress || quiet);
    let result = validate_model(request, &|c| backend::load(c, backend, no_progress, quiet), &|done, total| progress.update(done, total));
    progress.finish();
    result
}
