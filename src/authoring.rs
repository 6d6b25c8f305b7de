//! `mixq sensitivity` and `mixq recipe search`: arguments in, tables or JSON out.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use mixq_loader::source::{resolve_source, Need};
use mixq_loader::{GptOssConfig, ModelFingerprint};
use mixq_quantizer::authoring::recipe_search::{check_recipe, frontier, frontier_svg, parse_size, write_recipe, Problem, RecipeHeader, SearchOptions};
use mixq_quantizer::authoring::sensitivity_file::Sensitivity;
use mixq_quantizer::{QuantMethod, TensorClass};
use mixq_validate::sensitivity::{check_settings, ranked, sensitivity, SensitivityOptions, SensitivitySource};
use serde_json::json;

use crate::{print_json, progress, report};

/// Inputs of `mixq sensitivity`.
pub struct SensitivityArgs {
    pub model: Option<PathBuf>,
    pub synthetic_config: Option<PathBuf>,
    pub text: Option<PathBuf>,
    pub calibration: Option<PathBuf>,
    pub bits: Vec<u32>,
    pub group_sizes: Vec<u32>,
    pub tokens: usize,
    pub ctx: usize,
    pub quantizer: QuantMethod,
    pub measure: Vec<u32>,
    pub out: PathBuf,
    pub force: bool,
    pub quiet: bool,
    pub json: bool,
}

/// Runs `mixq sensitivity`.
pub fn run_sensitivity(a: &SensitivityArgs) -> Result<()> {
    crate::refuse_existing(&a.out, a.force)?;
    check_settings(&a.bits, &a.group_sizes)?;
    let (reference, second) = match a.measure.as_slice() {
        [b, g] => ((*b, *g), None),
        [b, g, b2, g2] => ((*b, *g), Some((*b2, *g2))),
        _ => bail!("--measure takes BITS,GROUP_SIZE or two of them (e.g. 3,64,5,64)"),
    };
    let opts = SensitivityOptions {
        bits: a.bits.clone(),
        group_sizes: a.group_sizes.clone(),
        quantizer: a.quantizer,
        reference,
        second,
        tokens: a.tokens,
        ctx: a.ctx,
    };
    let config;
    let (source, label) = match (&a.model, &a.synthetic_config) {
        (Some(dir), _) => (
            SensitivitySource::Checkpoint { dir, text: a.text.as_deref(), calibration: a.calibration.as_deref() },
            dir.display().to_string(),
        ),
        (None, Some(path)) => {
            config = GptOssConfig::from_file(path)?;
            (SensitivitySource::Synthetic(&config), format!("synthetic weights shaped as {}", path.display()))
        }
        _ => bail!("give --model DIR, or --synthetic-config CONFIG"),
    };
    let progress = progress::CountProgress::new("sensitivity", "units", a.quiet || a.json);
    let s = sensitivity(&source, &label, &opts, &|d, t| progress.update(d, t));
    progress.finish();
    let s = s?;
    s.write(&a.out).with_context(|| format!("writing {}", a.out.display()))?;
    if a.json {
        print_json(&json!({
            "out": a.out, "units": s.units.len(), "cost": s.cost_kind, "tokens": s.tokens, "seconds": s.seconds,
            "rank_correlation": s.rank_correlation,
            "ranked": ranked(&s).iter().map(|u| json!({"module": u.module, "class": u.class, "layer": u.layer, "measured_kl": u.measured_kl,
                "cost": u.setting(s.reference_setting).map(|x| x.cost)})).collect::<Vec<_>>(),
        }));
        return Ok(());
    }
    let (rb, rg) = s.reference_setting;
    println!("units by sensitivity (cost of quantizing the unit alone at {rb}-bit gs{rg}; {}):", s.cost_kind);
    println!("{:>4}  {:<16} {:>5} {:>12} {:>14} {:>12}", "rank", "class", "layer", "params", "cost", "bytes");
    for (i, u) in ranked(&s).iter().enumerate() {
        let at = u.setting(s.reference_setting);
        println!(
            "{:>4}  {:<16} {:>5} {:>12} {:>14.6e} {:>12}",
            i + 1,
            u.class,
            u.layer.map(|l| l.to_string()).unwrap_or_else(|| "-".into()),
            report::thousands(u.params as usize),
            at.map_or(0.0, |x| x.cost),
            at.map_or(0, |x| x.bytes)
        );
    }
    if let Some(r) = s.rank_correlation {
        println!("Spearman rank correlation of the weight-error proxy with the measured KL over the units: {r:.3}");
    }
    println!("wrote {} ({} units x {} settings) in {:.1}s", a.out.display(), s.units.len(), s.units.first().map_or(0, |u| u.settings.len()), s.seconds);
    Ok(())
}

/// Inputs of `mixq recipe search`.
pub struct SearchArgs {
    pub sensitivity: PathBuf,
    pub source: String,
    pub target_bpw: Option<f64>,
    pub target_size: Option<String>,
    pub out: PathBuf,
    pub min_bits: u32,
    pub keep_bf16: Vec<String>,
    pub name: Option<String>,
    pub frontier: bool,
    pub force: bool,
    pub json: bool,
}

/// Bits per weight of the frontier table.
const FRONTIER_BPW: [f64; 9] = [3.0, 3.25, 3.5, 3.75, 4.0, 4.25, 4.5, 4.75, 5.0];

/// Runs `mixq recipe search`.
pub fn run_search(a: &SearchArgs) -> Result<()> {
    crate::refuse_existing(&a.out, a.force)?;
    let sens = Sensitivity::read(&a.sensitivity)?;
    let resolved = resolve_source(&a.source, Need::Config)?;
    let config = GptOssConfig::from_file(&resolved.config_path())?;
    let sha = ModelFingerprint::architecture_sha256(&config);
    if sha != sens.config_sha256 {
        bail!(
            "{}: measured on another architecture (sha256 {}) than {} ({sha})",
            a.sensitivity.display(),
            sens.config_sha256,
            a.source
        );
    }
    let mut keep = Vec::new();
    for name in &a.keep_bf16 {
        let classes = TensorClass::parse_group(name).with_context(|| format!("--keep-bf16: unknown class \"{name}\""))?;
        keep.extend(classes);
    }
    let opts = SearchOptions { min_bits: a.min_bits, keep: keep.clone() };
    let problem = Problem::new(&sens, &config, &opts)?;
    let (target, target_label) = match (a.target_bpw, &a.target_size) {
        (Some(bpw), None) if bpw > 0.0 => ((bpw * problem.params as f64 / 8.0) as u64, format!("{bpw} bits per weight")),
        (None, Some(size)) => {
            let bytes = parse_size(size).with_context(|| format!("--target-size {size}: expected a size such as 48GiB, 51.9GB or a byte count"))?;
            (bytes, format!("{size} ({bytes} bytes)"))
        }
        _ => bail!("give exactly one of --target-bpw X (positive) or --target-size SIZE"),
    };
    let allot = problem.solve(target)?;
    let name = a.name.clone().unwrap_or_else(|| {
        a.out.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "searched".into())
    });
    let sens_label = a.sensitivity.display().to_string();
    let header = RecipeHeader { name: &name, sensitivity_path: &sens_label, target: &target_label };
    let text = write_recipe(&problem, &sens, &allot, &header, &keep);
    let planned = check_recipe(&text, &a.out.display().to_string(), &config, &allot).map_err(anyhow::Error::msg)?;
    if planned > target {
        bail!("internal error: the planned size {planned} exceeds the target {target}");
    }
    std::fs::write(&a.out, &text).with_context(|| format!("writing {}", a.out.display()))?;
    let bpw = 8.0 * planned as f64 / problem.params as f64;
    let rows = if a.frontier { frontier(&problem, &FRONTIER_BPW) } else { Vec::new() };
    let svg_path = a.frontier.then(|| svg_path(&a.out));
    if let Some(p) = &svg_path {
        let points: Vec<(f64, f64)> = rows.iter().filter_map(|(b, x)| x.as_ref().map(|x| (*b, x.cost))).collect();
        std::fs::write(p, frontier_svg(&points, &format!("predicted {} frontier of {}", sens.cost_kind, sens.model)))
            .with_context(|| format!("writing {}", p.display()))?;
    }
    if a.json {
        print_json(&json!({
            "out": a.out, "target_bytes": target, "bytes": planned, "bits_per_weight": bpw, "predicted_cost": allot.cost,
            "frontier_svg": svg_path,
            "frontier": rows.iter().map(|(b, x)| json!({"target_bpw": b, "bytes": x.as_ref().map(|x| x.bytes),
                "bits_per_weight": x.as_ref().map(|x| 8.0 * x.bytes as f64 / problem.params as f64), "predicted_cost": x.as_ref().map(|x| x.cost)})).collect::<Vec<_>>(),
        }));
        return Ok(());
    }
    println!(
        "wrote {}: {} bytes ({:.2} GiB), {bpw:.3} bits per weight, predicted summed cost {:.6} (target {target_label})",
        a.out.display(),
        report::thousands(planned as usize),
        planned as f64 / (1u64 << 30) as f64,
        allot.cost
    );
    if a.frontier {
        println!("\npredicted frontier ({}):", sens.cost_kind);
        println!("| target BPW | bytes | GiB | BPW | predicted cost |\n|---|---|---|---|---|");
        for (b, x) in &rows {
            match x {
                Some(x) => println!(
                    "| {b:.2} | {} | {:.2} | {:.3} | {:.6} |",
                    report::thousands(x.bytes as usize),
                    x.bytes as f64 / (1u64 << 30) as f64,
                    8.0 * x.bytes as f64 / problem.params as f64,
                    x.cost
                ),
                None => println!("| {b:.2} | below the smallest possible size | | | |"),
            }
        }
        if let Some(p) = svg_path {
            println!("plot: {}", p.display());
        }
    }
    Ok(())
}

/// `recipe.yaml` → `recipe.frontier.svg`, next to it.
fn svg_path(out: &Path) -> PathBuf {
    let stem = out.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "recipe".into());
    out.with_file_name(format!("{stem}.frontier.svg"))
}
