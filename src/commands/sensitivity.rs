//! `mixq sensitivity`: per unit and setting, the cost of quantizing the unit alone, and its size.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use mixq_quantizer::authoring::sensitivity_file::Sensitivity;
use mixq_quantizer::QuantMethod;
use mixq_validate::sensitivity::ranked;
use mixq_validate::sensitivity_job::{sensitivity_job, SensitivityRequest};
use mixq_validate::validate_job::Loader;
use mixq_validate::ValidateError;
use serde_json::json;

use crate::args::{parse_quantizer, Json, OutFile, Quiet, Threads};
use crate::backend::{self, BackendArgs};
use crate::progress::CountProgress;
use crate::report::{print_json, thousands};

/// Arguments of `mixq sensitivity`.
#[derive(clap::Args)]
#[command(after_help = "Example:\n  mixq sensitivity --model models/tiny-gpt-oss-shakespeare --text search.txt --tokens 8192 --out sens.json\n\nA flag's default is shown as [default: ...] or in its help.")]
#[command(
    mut_arg("out", |a| a.help("The sensitivity file to write (JSON)"))
)]
pub struct SensitivityArgs {
    /// The source checkpoint (upstream MXFP4 or transformers' dense layout).
    #[arg(long, required_unless_present = "synthetic_config", conflicts_with = "synthetic_config")]
    model: Option<PathBuf>,
    /// A config.json alone: deterministic synthetic rows stand in for the weights (proxy costs).
    #[arg(long)]
    synthetic_config: Option<PathBuf>,
    /// Text to measure KL on (without it the costs are the weight-error proxy).
    #[arg(long, requires = "model")]
    text: Option<PathBuf>,
    /// Calibration statistics (`mixq calibrate`) weighting the proxy and the mse quantizer.
    #[arg(long, requires = "model")]
    calibration: Option<PathBuf>,
    /// Bit widths to measure.
    #[arg(long, value_delimiter = ',', default_value = "2,3,4,5,6,8")]
    bits: Vec<u32>,
    /// Group sizes to measure.
    #[arg(long, value_delimiter = ',', default_value = "32,64,128")]
    group_sizes: Vec<u32>,
    /// Tokens of the text the KL is measured on.
    #[arg(long, default_value_t = 2048, value_parser = crate::args::at_least_1)]
    tokens: usize,
    /// Window length in tokens.
    #[arg(long, default_value_t = 512, value_parser = crate::args::at_least_1)]
    ctx: usize,
    /// Tokens the model writes itself (sampled, no text needed) for the cheap estimate of each
    /// unit's KL: measured on these tokens at the --measure settings from the stored residual
    /// stream (only the unit's block and what follows it run), carried to the other settings by
    /// its block's output error. It is the cost without --text; with --text it is checked against
    /// the measured KL (0: no estimate).
    #[arg(long, default_value_t = 1024)]
    probe_tokens: usize,
    /// The quantizer the settings are made with.
    #[arg(long, default_value = "mse", value_parser = parse_quantizer)]
    quantizer: QuantMethod,
    /// The settings (BITS,GROUP_SIZE[,BITS,GROUP_SIZE]) whose KL is measured for every unit:
    /// the first ranks the units, the second fixes how KL scales with the weight error.
    #[arg(long, value_delimiter = ',', default_value = "3,64,5,64")]
    measure: Vec<u32>,
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

/// Runs `mixq sensitivity`.
pub fn run(a: SensitivityArgs) -> Result<ExitCode> {
    a.out.refuse_existing()?;
    let pool = a.threads.pool()?;
    let quiet = a.quiet.quiet || a.json.json;
    let progress = CountProgress::new("sensitivity", "units", quiet);
    let s = pool.install(|| {
        let load: &Loader<'_, ValidateError> =
            &|c| backend::load(c, &a.backend, quiet, a.quiet.quiet).map_err(|e| ValidateError::Backend(format!("{e:#}")));
        let request = SensitivityRequest {
        model: a.model.as_deref(),
        synthetic_config: a.synthetic_config.as_deref(),
        text: a.text.as_deref(),
        calibration: a.calibration.as_deref(),
        bits: &a.bits,
        group_sizes: &a.group_sizes,
        tokens: a.tokens,
        ctx: a.ctx,
        probe_tokens: a.probe_tokens,
        quantizer: a.quantizer,
        measure: &a.measure,
        out: &a.out.out,
        load,
        };
        sensitivity_job(&request, &|d, t| progress.update(d, t))
    });
    progress.finish();
    let s = s?;
    if a.json.json {
        print_json(&json!({
            "out": a.out.out, "units": s.units.len(), "cost": s.cost_kind, "tokens": s.tokens, "seconds": s.seconds,
            "rank_correlation": s.rank_correlation, "proxy_rank_correlation": s.proxy_rank_correlation, "probe_tokens": s.probe_tokens, "real_run": s.real_run,
            "ranked": ranked(&s).iter().map(|u| json!({"module": u.module, "class": u.class, "layer": u.layer, "measured_kl": u.measured_kl,
                "cost": u.setting(s.reference_setting).map(|x| x.cost)})).collect::<Vec<_>>(),
        }));
    } else {
        print_table(&s, &a.out.out);
    }
    Ok(ExitCode::SUCCESS)
}

/// The units by sensitivity as a table, and what was written.
fn print_table(s: &Sensitivity, out: &std::path::Path) {
    let (rb, rg) = s.reference_setting;
    println!("units by sensitivity (cost of quantizing the unit alone at {rb}-bit gs{rg}; {}):", s.cost_kind);
    println!("{:>4}  {:<16} {:>5} {:>12} {:>14} {:>12}", "rank", "class", "layer", "params", "cost", "bytes");
    for (i, u) in ranked(s).iter().enumerate() {
        let at = u.setting(s.reference_setting);
        println!(
            "{:>4}  {:<16} {:>5} {:>12} {:>14.6e} {:>12}",
            i + 1,
            u.class,
            u.layer.map(|l| l.to_string()).unwrap_or_else(|| "-".into()),
            thousands(u.params as usize),
            at.map_or(0.0, |x| x.cost),
            at.map_or(0, |x| x.bytes)
        );
    }
    if let Some(r) = s.rank_correlation {
        println!(
            "Spearman rank correlation with the measured KL over the units: cheap estimate ({} self-written tokens) {r:.3}",
            thousands(s.probe_tokens)
        );
    }
    if let Some(r) = s.proxy_rank_correlation {
        println!("Spearman rank correlation of the weight-error proxy with the measured KL: {r:.3}");
    }
    if let Some(r) = &s.real_run {
        let hours = |secs: f64| secs / 3600.0;
        let total = r.quantize_seconds + r.model_seconds;
        println!(
            "the real run without --text (--probe-tokens {}): quantizing {:.0} G weights ({:.1} h) and {:.1} TFLOP of model runs ({:.1} h at the runtime's {:.1} GFLOP/s): {:.1} h on these {} threads, about {:.1} h on 16 cores at the same rate per core; peak memory about {} besides the memory-mapped checkpoint",
            thousands(r.probe_tokens),
            r.weights_quantized / 1e9,
            hours(r.quantize_seconds),
            r.model_flops / 1e12,
            hours(r.model_seconds),
            r.flops_per_second / 1e9,
            hours(total),
            r.threads,
            hours(total) * r.threads as f64 / 16.0,
            mixq_quantizer::sizes::human_bytes(r.peak_bytes)
        );
    }
    println!("wrote {} ({} units x {} settings) in {:.1}s", out.display(), s.units.len(), s.units.first().map_or(0, |u| u.settings.len()), s.seconds);
}
