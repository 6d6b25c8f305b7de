//! `mixq recipe search`: the least-cost recipe under a size budget, from a sensitivity file.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use mixq_quantizer::authoring::recipe_search::{Allotment, Problem};
use mixq_quantizer::authoring::search_job::{search_recipe, Refine, SearchRequest, SearchedRecipe};
use mixq_quantizer::authoring::sensitivity_file::Sensitivity;
use mixq_validate::refine::{refine_search, RefineOptions, RefineRequest};
use mixq_quantizer::sizes::gib;
use serde_json::json;

use crate::args::{refuse_existing, Json};
use crate::report::{on_disk_json, on_disk_text, print_json, thousands};
use crate::progress::CountProgress;

/// Window length of refinement's measurements.
const REFINE_CTX: usize = 512;
/// Upgrade and downgrade candidates measured per refinement round.
const REFINE_CANDIDATES: usize = 3;

/// Arguments of `mixq recipe search`.
#[derive(clap::Args)]
#[command(after_help = "Example:\n  mixq recipe search --sensitivity sens.json --source openai/gpt-oss-120b --target-size 48GiB --out searched.yaml --frontier\n\nA flag's default is shown as [default: ...] or in its help.")]
pub struct SearchArgs {
    /// The sensitivity file (`mixq sensitivity`).
    #[arg(long)]
    sensitivity: PathBuf,
    /// The model (folder, repo id or config.json) the recipe is for.
    #[arg(long)]
    source: String,
    /// Size budget in bits per weight (give this or --target-size).
    #[arg(long, conflicts_with = "target_size", required_unless_present = "target_size", value_parser = crate::args::positive)]
    target_bpw: Option<f64>,
    /// Size budget: 48GiB, 51.9GB, 900MiB (units in any case) or a whole number of bytes.
    #[arg(long)]
    target_size: Option<String>,
    /// The recipe to write (YAML).
    #[arg(long)]
    out: PathBuf,
    /// Smallest affine bit width allowed: 2, 3, 4, 5, 6 or 8.
    #[arg(long, default_value_t = 3, value_parser = crate::args::bit_width)]
    min_bits: u32,
    /// Affine settings only: never keep an expert in mxfp4 (which passes upstream MXFP4 experts
    /// through unchanged, at 4.25 bits per weight and no error).
    #[arg(long)]
    affine_only: bool,
    /// Classes kept in bf16.
    #[arg(long, value_delimiter = ',', default_value = "norm,router,bias,sinks")]
    keep_bf16: Vec<String>,
    /// The recipe's name (default: the file's stem).
    #[arg(long)]
    name: Option<String>,
    /// Also print the predicted size/KL frontier from 3 to 5 bits per weight and plot it as
    /// SVG next to the recipe.
    #[arg(long)]
    frontier: bool,
    /// After the search, refine it for N rounds of local moves measured on the whole candidate
    /// model (needs --refine-text and a --source with weights; 0: predicted costs only).
    #[arg(long, default_value_t = 0)]
    refine_rounds: usize,
    /// Tokens of --refine-text each candidate model is measured on.
    #[arg(long, default_value_t = 2048, value_parser = crate::args::at_least_1)]
    refine_tokens: usize,
    /// Text the refinement measures candidates on (not the text you validate on).
    #[arg(long)]
    refine_text: Option<PathBuf>,
    /// Calibration statistics the recipe will be converted with (used by refinement's quantizer).
    #[arg(long)]
    calibration: Option<PathBuf>,
    /// Replace an existing recipe file.
    #[arg(long)]
    force: bool,
    #[command(flatten)]
    json: Json,
}

/// Runs `mixq recipe search`.
pub fn run(a: SearchArgs) -> Result<ExitCode> {
    refuse_existing(&a.out, a.force)?;
    let refine_request = match (a.refine_rounds, &a.refine_text) {
        (0, _) => None,
        (_, None) => anyhow::bail!("--refine-rounds {} measures candidate models on a text: give --refine-text FILE", a.refine_rounds),
        (rounds, Some(text)) => Some(RefineRequest {
            source: &a.source,
            text,
            calibration: a.calibration.as_deref(),
            opts: RefineOptions { rounds, tokens: a.refine_tokens, ctx: REFINE_CTX, candidates: REFINE_CANDIDATES },
            show_downloads: !a.json.json,
        }),
    };
    let progress = CountProgress::new("refine", "rounds", a.json.json);
    let refine = |sens: &Sensitivity, problem: &Problem<'_>, start: Allotment, target: u64| -> Result<(Allotment, String), Box<dyn std::error::Error + Send + Sync>> {
        let r = refine_request.as_ref().expect("called only when asked");
        let refined = refine_search(r, sens, problem, start, target, &|d, t| progress.update(d, t))?;
        Ok((refined.allot.clone(), refined.describe()))
    };
    let refine: &Refine<'_> = &refine;
    let found = search_recipe(&SearchRequest {
        sensitivity: &a.sensitivity,
        source: &a.source,
        target_bpw: a.target_bpw,
        target_size: a.target_size.as_deref(),
        out: &a.out,
        min_bits: a.min_bits,
        affine_only: a.affine_only,
        keep_bf16: &a.keep_bf16,
        name: a.name.as_deref(),
        frontier: a.frontier,
        refine: refine_request.as_ref().map(|_| refine),
    });
    progress.finish();
    let found = found?;
    if a.json.json {
        print_json(&json!({
            "out": a.out, "target_bytes": found.target, "bytes": found.bytes, "bits_per_weight": found.bits_per_weight,
            "on_disk": on_disk_json(&found.on_disk), "predicted_cost": found.cost, "refined": found.refined,
            "frontier_svg": found.svg,
            "frontier": found.frontier.iter().map(|p| json!({"target_bpw": p.target_bpw, "bytes": p.found.map(|x| x.0),
                "bits_per_weight": p.found.map(|x| x.1), "predicted_cost": p.found.map(|x| x.2)})).collect::<Vec<_>>(),
        }));
    } else {
        print_text(&a, &found);
    }
    Ok(ExitCode::SUCCESS)
}

/// What was written, and the frontier table when asked.
fn print_text(a: &SearchArgs, found: &SearchedRecipe) {
    println!(
        "wrote {}: {} bytes of tensors ({:.2} GiB), {:.3} bits per weight, predicted summed cost {:.6} (target {})",
        a.out.display(),
        thousands(found.bytes as usize),
        gib(found.bytes as usize),
        found.bits_per_weight,
        found.cost,
        found.target_label
    );
    print!("{}", on_disk_text(&found.on_disk));
    if let Some(r) = &found.refined {
        println!("refined: {r}");
    }
    if !a.frontier {
        return;
    }
    println!("\npredicted frontier ({}):", found.cost_kind);
    println!("| target BPW | bytes | GiB | BPW | predicted cost |\n|---|---|---|---|---|");
    for p in &found.frontier {
        let b = p.target_bpw;
        match p.found {
            Some((bytes, bpw, cost)) => {
                println!("| {b:.2} | {} | {:.2} | {bpw:.3} | {cost:.6} |", thousands(bytes as usize), gib(bytes as usize))
            }
            None => println!("| {b:.2} | below the smallest possible size | | | |"),
        }
    }
    if let Some(p) = &found.svg {
        println!("plot: {}", p.display());
    }
}
