//! `mixq convert`: an upstream checkpoint to an MLX checkpoint following a recipe.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use mixq_quantizer::{ConvertOptions, QuantMethod};

use crate::args::{parse_quantizer, Json, Quiet, Threads};
use crate::progress::StderrProgress;
use crate::report::{print_json, thousands};

/// Arguments of `mixq convert`.
#[derive(clap::Args)]
#[command(after_help = "Example:\n  mixq convert --source openai/gpt-oss-120b --recipe gpt-oss-120b-3.6bit --out gpt-oss-120b-mlx-3.6bit\n  mixq convert --source models/tiny-gpt-oss-shakespeare --recipe mixed_3_6 --out /tmp/tiny --base-model me/tiny --license apache-2.0 --upload-repo me/tiny-mlx\n\nA flag's default is shown as [default: ...] or in its help.")]
#[command(mut_arg("json", |a| a.help("Print one JSON object when done")))]
pub struct ConvertArgs {
    /// Checkpoint folder or hub repo id (owner/name).
    #[arg(long)]
    source: String,
    /// Recipe name or path to a YAML file.
    #[arg(long)]
    recipe: String,
    /// Output folder (must be absent or empty unless --force).
    #[arg(long)]
    out: PathBuf,
    /// Replace a non-empty output folder.
    #[arg(long)]
    force: bool,
    #[command(flatten)]
    threads: Threads,
    /// Largest shard: bytes or a size such as 2GiB, at least 64 KiB (default 5 GiB, as mlx-lm).
    #[arg(long, default_value_t = mixq_quantizer::writer::convert::MAX_SHARD_BYTES, value_parser = crate::args::shard_bytes)]
    max_shard_bytes: u64,
    /// How affine groups get their scale and bias where the recipe does not say: `mse`
    /// searches for the least (calibration-weighted) error; `gptq` adds error feedback through
    /// the input Hessians (needs `--calibration` from `mixq calibrate --hessian`); `minmax` is
    /// byte-identical to `mx.quantize`. Default: `gptq` when the calibration holds Hessians,
    /// else `mse`.
    #[arg(long, value_parser = parse_quantizer)]
    quantizer: Option<QuantMethod>,
    /// Calibration statistics from `mixq calibrate` on this source, weighting the `mse` search
    /// (and, with Hessians, driving `gptq`).
    #[arg(long)]
    calibration: Option<PathBuf>,
    /// Continue an interrupted conversion to this --out: shards it finished are re-hashed
    /// against its journal and kept, only the rest are written.
    #[arg(long)]
    resume: bool,
    /// Skip the free-space check (for filesystems that misreport it, e.g. with compression).
    #[arg(long)]
    no_space_check: bool,
    /// The model card's `base_model`: the hub repo (owner/name) this model derives from
    /// (default: --source when it is a repo id; a local path is never written).
    #[arg(long, value_parser = crate::args::repo_id)]
    base_model: Option<String>,
    /// The model card's `license` (e.g. apache-2.0; default: the source card's, if it has one).
    #[arg(long)]
    license: Option<String>,
    /// After converting, verify the output and upload it to this hub repo (owner/name), as
    /// `mixq publish` does.
    #[arg(long, value_parser = crate::args::repo_id)]
    upload_repo: Option<String>,
    #[command(flatten)]
    hub: super::publish::HubTarget,
    #[command(flatten)]
    quiet: Quiet,
    #[command(flatten)]
    json: Json,
}

/// Runs `mixq convert`.
pub fn run(a: ConvertArgs) -> Result<ExitCode> {
    let json = a.json.json;
    let opts = ConvertOptions {
        force: a.force,
        max_shard_bytes: a.max_shard_bytes,
        source_label: a.source.clone(),
        quantizer: a.quantizer,
        calibration: a.calibration,
        resume: a.resume,
        check_space: !a.no_space_check,
        base_model: a.base_model,
        license: a.license,
        show_downloads: !a.quiet.quiet,
    };
    let pool = a.threads.pool()?;
    let progress = StderrProgress::new(json, a.quiet.quiet);
    let result = pool.install(|| mixq_quantizer::writer::jobs::convert_source(&a.source, &a.recipe, &a.out, &opts, &progress));
    progress.finish();
    let run = result?;
    let uploaded = match &a.upload_repo {
        Some(repo) => Some(super::publish::upload(&a.out, repo, &a.hub, a.quiet.quiet || json)?),
        None => None,
    };
    let (rep, s, secs) = (&run.report, &run.report.summary, run.seconds);
    if json {
        print_json(&serde_json::json!({
            "out": rep.out, "recipe": run.recipe_name, "quantizer": rep.quantizer.as_str(), "shards": rep.shards, "seconds": secs,
            "kept_shards": rep.kept_shards,
            "source_bytes": rep.source_bytes, "bytes": s.bytes, "parameters": s.params,
            "bits_per_weight": s.bits_per_weight(),
            "uploaded_to": a.upload_repo, "commit_url": uploaded.as_ref().and_then(|u| u.commit_url.clone()),
        }));
    } else {
        println!(
            "wrote {} ({} shard(s), {} bytes, {:.3} bits per weight) in {:.2}s ({:.1} MiB/s of source)",
            rep.out.display(),
            rep.shards.len(),
            thousands(s.bytes),
            s.bits_per_weight(),
            secs,
            run.source_mib_per_second()
        );
        if let (Some(repo), Some(u)) = (&a.upload_repo, &uploaded) {
            println!("uploaded to {repo} ({}): {} files{}", a.hub.revision, u.files, u.commit_url.as_ref().map(|c| format!("; {c}")).unwrap_or_default());
        }
    }
    Ok(ExitCode::SUCCESS)
}
