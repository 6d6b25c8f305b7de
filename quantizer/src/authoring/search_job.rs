//! The `recipe search` job: a sensitivity file and a model's config in, the searched recipe (and
//! optionally the frontier and its plot) written next to each other.

use std::path::{Path, PathBuf};

use mixq_loader::source::{resolve_source, Need};
use mixq_loader::{GptOssConfig, LoaderError, ModelFingerprint};

use mixq_loader::schema::TensorClass;
use crate::authoring::recipe_search::{check_recipe, Allotment, frontier, frontier_svg, parse_size_flag, write_recipe, Problem, RecipeHeader, SearchError, SearchOptions};
use crate::authoring::sensitivity_file::{Sensitivity, SensitivityError};

/// Bits per weight of the frontier table.
pub const FRONTIER_BPW: [f64; 9] = [3.0, 3.25, 3.5, 3.75, 4.0, 4.25, 4.5, 4.75, 5.0];

/// Anything that stops a recipe search job.
#[derive(Debug, thiserror::Error)]
pub enum SearchJobError {
    /// The sensitivity file is unusable.
    #[error(transparent)]
    Sensitivity(#[from] SensitivityError),
    /// The model's config could not be resolved or read.
    #[error(transparent)]
    Loader(#[from] LoaderError),
    /// The search cannot meet its target, or the file does not fit the model.
    #[error(transparent)]
    Search(#[from] SearchError),
    /// The sensitivity file was measured on another architecture.
    #[error("{file}: measured on another architecture (sha256 {measured}) than {source_label} ({found})")]
    Architecture {
        /// The sensitivity file.
        file: String,
        /// The architecture sha256 it records.
        measured: String,
        /// The model, as named.
        source_label: String,
        /// The model's architecture sha256.
        found: String,
    },
    /// An argument is unusable (the message names it).
    #[error("{0}")]
    Input(String),
    /// Refinement by measurement failed.
    #[error("refining the searched recipe: {0}")]
    Refine(Box<dyn std::error::Error + Send + Sync>),
    /// A file could not be written.
    #[error("writing {0}")]
    Write(PathBuf, #[source] std::io::Error),
}

/// Checks that the sensitivity file `sens` (read from `file`) was measured on `config`'s architecture.
pub fn check_architecture(sens: &Sensitivity, file: &Path, config: &GptOssConfig, source_label: &str) -> Result<(), SearchJobError> {
    let found = ModelFingerprint::architecture_sha256(config);
    if found == sens.config_sha256 {
        return Ok(());
    }
    Err(SearchJobError::Architecture {
        file: file.display().to_string(),
        measured: sens.config_sha256.clone(),
        source_label: source_label.to_string(),
        found,
    })
}

/// The classes named by `--keep-bf16` (class or group names).
pub fn keep_classes(names: &[String]) -> Result<Vec<TensorClass>, SearchJobError> {
    let mut keep = Vec::new();
    for name in names {
        let classes = TensorClass::parse_group(name).ok_or_else(|| SearchJobError::Input(format!("--keep-bf16: unknown class \"{name}\"")))?;
        keep.extend(classes);
    }
    Ok(keep)
}

/// The size budget in bytes and how to name it, from `--target-bpw` over `params` or `--target-size`.
pub fn target_bytes(target_bpw: Option<f64>, target_size: Option<&str>, params: u64) -> Result<(u64, String), SearchJobError> {
    match (target_bpw, target_size) {
        (Some(bpw), None) if bpw > 0.0 => Ok(((bpw * params as f64 / 8.0) as u64, format!("{bpw} bits per weight"))),
        (None, Some(size)) => {
            let bytes = parse_size_flag("--target-size", size).map_err(SearchJobError::Input)?;
            Ok((bytes, format!("{size} ({bytes} bytes)")))
        }
        _ => Err(SearchJobError::Input("give exactly one of --target-bpw X (positive) or --target-size SIZE".into())),
    }
}

/// What `recipe search` is asked for.
pub struct SearchRequest<'a> {
    /// The sensitivity file.
    pub sensitivity: &'a Path,
    /// The model (folder, repo id or config.json).
    pub source: &'a str,
    /// Budget in bits per weight.
    pub target_bpw: Option<f64>,
    /// Budget as a size (48GiB, 51.9GB, bytes).
    pub target_size: Option<&'a str>,
    /// The recipe file to write.
    pub out: &'a Path,
    /// Smallest affine bit width.
    pub min_bits: u32,
    /// Class names kept in bf16.
    pub keep_bf16: &'a [String],
    /// The recipe's name (default: the file's stem).
    pub name: Option<&'a str>,
    /// Also compute the frontier and plot it.
    pub frontier: bool,
    /// Improves the searched allotment by measuring whole candidate models (the validator's
    /// refinement), where asked.
    pub refine: Option<&'a Refine<'a>>,
}

/// Improves an allotment of a problem within a byte budget by measurement; returns the new one and
/// a line saying what was measured.
pub type Refine<'r> = dyn Fn(&Sensitivity, &Problem<'_>, Allotment, u64) -> Result<(Allotment, String), Box<dyn std::error::Error + Send + Sync>> + 'r;

/// One point of the frontier: the best allocation at a target bits per weight, if any fits.
pub struct FrontierPoint {
    /// The target bits per weight.
    pub target_bpw: f64,
    /// (bytes, bits per weight, predicted cost) of the allocation, `None` below the smallest size.
    pub found: Option<(u64, f64, f64)>,
}

/// A written recipe and its figures.
pub struct SearchedRecipe {
    /// The budget in bytes.
    pub target: u64,
    /// The budget as given.
    pub target_label: String,
    /// The recipe's size as `plan` computes it.
    pub bytes: u64,
    /// Its bits per weight.
    pub bits_per_weight: f64,
    /// Its summed predicted cost.
    pub cost: f64,
    /// What refinement measured, if it ran.
    pub refined: Option<String>,
    /// What the cost measures (the sensitivity file's cost kind).
    pub cost_kind: String,
    /// The frontier (empty unless asked).
    pub frontier: Vec<FrontierPoint>,
    /// Where the frontier plot was written.
    pub svg: Option<PathBuf>,
}

/// Searches the least-cost recipe within the budget, checks it against the plan and writes it.
pub fn search_recipe(r: &SearchRequest<'_>) -> Result<SearchedRecipe, SearchJobError> {
    let sens = Sensitivity::read(r.sensitivity)?;
    let config = GptOssConfig::from_file(&resolve_source(r.source, Need::Config, true)?.config_path())?;
    check_architecture(&sens, r.sensitivity, &config, r.source)?;
    let keep = keep_classes(r.keep_bf16)?;
    let problem = Problem::new(&sens, &config, &SearchOptions { min_bits: r.min_bits, keep: keep.clone() })?;
    let (target, target_label) = target_bytes(r.target_bpw, r.target_size, problem.params)?;
    let all_bf16 = problem.bf16_bytes();
    if target >= all_bf16 {
        return Err(SearchJobError::Input(format!(
            "target {target_label} is at or above the model's size with every unit in bf16 ({all_bf16} bytes, {:.3} bits per weight): nothing would be quantized; pick a smaller target",
            mixq_loader::bits_per_weight(all_bf16 as usize, problem.params as usize)
        )));
    }
    let allot = problem.solve(target)?;
    let (allot, refined) = match r.refine {
        Some(refine) => {
            let (a, line) = refine(&sens, &problem, allot, target).map_err(SearchJobError::Refine)?;
            (a, Some(line))
        }
        None => (allot, None),
    };
    let name = r.name.map(str::to_string).unwrap_or_else(|| stem(r.out, "searched"));
    let sens_label = r.sensitivity.display().to_string();
    let header = RecipeHeader { name: &name, sensitivity_path: &sens_label, target: &target_label, refined: refined.as_deref() };
    let text = write_recipe(&problem, &sens, &allot, &header, &keep);
    let planned = check_recipe(&text, &r.out.display().to_string(), &config, &allot).map_err(SearchJobError::Input)?;
    if planned > target {
        return Err(SearchJobError::Input(format!("internal error: the planned size {planned} exceeds the target {target}")));
    }
    std::fs::write(r.out, &text).map_err(|e| SearchJobError::Write(r.out.to_path_buf(), e))?;
    let bpw = |bytes: u64| mixq_loader::bits_per_weight(bytes as usize, problem.params as usize);
    let rows = if r.frontier { frontier(&problem, &FRONTIER_BPW) } else { Vec::new() };
    let svg = r.frontier.then(|| r.out.with_file_name(format!("{}.frontier.svg", stem(r.out, "recipe"))));
    if let Some(p) = &svg {
        let points: Vec<(f64, f64)> = rows.iter().filter_map(|(b, x)| x.as_ref().map(|x| (*b, x.cost))).collect();
        std::fs::write(p, frontier_svg(&points, &format!("predicted {} frontier of {}", sens.cost_kind, sens.model)))
            .map_err(|e| SearchJobError::Write(p.clone(), e))?;
    }
    let frontier = rows
        .into_iter()
        .map(|(target_bpw, x)| FrontierPoint { target_bpw, found: x.map(|x| (x.bytes, bpw(x.bytes), x.cost)) })
        .collect();
    Ok(SearchedRecipe { target, target_label, bytes: planned, bits_per_weight: bpw(planned), cost: allot.cost, refined, cost_kind: sens.cost_kind, frontier, svg })
}

/// The file stem of `path`, or `fallback`.
fn stem(path: &Path, fallback: &str) -> String {
    path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| fallback.into())
}
