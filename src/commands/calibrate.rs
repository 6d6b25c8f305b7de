//! `mixq calibrate`: activation statistics of a model over a text, for `convert --calibration`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;

use mixq_validate::calibrate::HessianScope;
use mixq_validate::validate_job::Loader;
use mixq_validate::ValidateError;

use crate::args::{Json, OutFile, Quiet, Threads};
use crate::backend::{self, BackendArgs};
use crate::progress::CountProgress;
use crate::report::print_json;

/// Arguments of `mixq calibrate`.
#[derive(clap::Args)]
#[command(after_help = "Example:\n  mixq calibrate --model openai/gpt-oss-120b --text calibration.txt --max-tokens 65536 --hessian --out gpt-oss-120b.stats.safetensors\n\nA flag's default is shown as [default: ...] or in its help.")]
#[command(
    mut_arg("out", |a| a.help("The statistics file to write (safetensors)")),
    mut_arg("force", |a| a.help("Replace an existing statistics file")),
    mut_arg("json", |a| a.help("Print one JSON object when done"))
)]
pub struct CalibrateArgs {
    /// The source checkpoint (folder or hub repo id, as given to convert) or a conversion of it.
    #[arg(long)]
    model: String,
    /// A UTF-8 text file, tokenized with the model's tokenizer.
    #[arg(long)]
    text: PathBuf,
    /// Use at most this many tokens of the text (default: all of it).
    #[arg(long, value_parser = crate::args::at_least_1)]
    max_tokens: Option<usize>,
    /// Window length in tokens.
    #[arg(long, default_value_t = 512, value_parser = crate::args::at_least_1)]
    ctx: usize,
    /// Also record the linear inputs' second-moment matrices (Hessians), which `convert
    /// --quantizer gptq` needs and then uses by default: per layer one for q/k/v, one for o_proj,
    /// one for the router and the experts' gate/up, and one for lm_head (gpt-oss-120b: 2.4 GB).
    #[arg(long)]
    hessian: bool,
    /// Also one Hessian per expert at the gate/up and at the down input (gptq uses each expert's
    /// own where it saw at least 64 tokens; down projections get feedback only from these). Large:
    /// gpt-oss-120b would need 153 GB.
    #[arg(long)]
    expert_hessians: bool,
    #[command(flatten)]
    out: OutFile,
    #[command(flatten)]
    backend: BackendArgs,
    #[command(flatten)]
    threads: Threads,
    #[command(flatten)]
    quiet: Quiet,
    #[command(flatten)]
    json: Json,
}

/// Runs `mixq calibrate`.
pub fn run(a: CalibrateArgs) -> Result<ExitCode> {
    a.out.refuse_existing()?;
    let json = a.json.json;
    let pool = a.threads.pool()?;
    let progress = CountProgress::new("calibrate", "tokens", a.quiet.quiet || json);
    let hessians = match (a.hessian, a.expert_hessians) {
        (_, true) => HessianScope::PerExpert,
        (true, false) => HessianScope::Shared,
        (false, false) => HessianScope::None,
    };
    let opts = mixq_validate::CalibrateOptions { ctx: a.ctx, max_tokens: a.max_tokens, hessians, show_downloads: !a.quiet.quiet };
    let out = &a.out.out;
    let job = pool.install(|| {
        let load: &Loader<'_, ValidateError> =
            &|c| backend::load(c, &a.backend, a.quiet.quiet || json, a.quiet.quiet).map_err(|e| ValidateError::Backend(format!("{e:#}")));
        mixq_validate::calibrate_job::calibrate_source(&a.model, load, &a.text, opts, out, &|d, t| progress.update(d, t))
    });
    progress.finish();
    let job = job?;
    let (s, run) = (&job.run.stats, &job.run);
    let (hit, all, rate) = (job.experts_reached, job.experts, job.run.tokens_per_second());
    if json {
        print_json(&serde_json::json!({
            "out": out, "model": a.model, "text_sha256": s.text_sha256, "tokens": s.tokens, "ctx": s.ctx,
            "windows": run.windows, "seconds": run.seconds, "tokens_per_second": rate,
            "tensors": s.tensors.len(), "hessians": s.hessians.len(), "experts_reached": hit, "experts": all,
            "config_sha256": s.model.config_sha256, "weights_sha256": s.model.weights_sha256,
        }));
    } else {
        println!(
            "wrote {} ({} tensors, {} Hessians) from {} tokens in {} windows of {} in {:.2}s ({rate:.0} tokens/s); {hit} of {all} experts reached",
            out.display(),
            s.tensors.len(),
            s.hessians.len(),
            s.tokens,
            run.windows,
            s.ctx,
            run.seconds
        );
    }
    Ok(ExitCode::SUCCESS)
}
