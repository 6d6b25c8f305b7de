//! The `recipe search` job: a sensitivity file and a model's config in, the searched recipe (and
//! optionally the frontier and its plot) written next to each other.

use std::path::{Path, PathBuf};

use mixq_loader::{GptOssConfig, LoaderError, ModelFingerprint};

use mixq_loader::schema::TensorClass;
use crate::authoring::recipe_search::{check_recipe, frontier, frontier_svg, parse_size_flag, write_recipe, Allotment, Problem, RecipeHeader, SearchError, SearchOptions};
use crate::authoring::sensitivity_file::{Sensitivity, SensitivityError};
use crate::recipe::language::Recipe;
use crate::writer::on_disk::{on_disk, OnDisk, SourceFiles};

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

/// A size budget and what it counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Budget {
    /// Bytes of tensor data (`--target-bpw`: bits per weight count tensor data only).
    Tensors(u64),
    /// Bytes of the converted model's files on disk (`--target-size`), as `mixq plan` counts them.
    OnDisk(u64),
}

impl Budget {
    /// The budget in bytes.
    pub fn bytes(self) -> u64 {
        match self {
            Budget::Tensors(b) | Budget::OnDisk(b) => b,
        }
    }

    /// What an allocation with `tensor_bytes` of tensors and files `disk` spends of this budget.
    fn spent(self, tensor_bytes: u64, disk: &OnDisk) -> u64 {
        match self {
            Budget::Tensors(_) => tensor_bytes,
            Budget::OnDisk(_) => disk.total(),
        }
    }
}

/// The size budget and how to name it, from `--target-bpw` over `params` or `--target-size`.
pub fn target_bytes(target_bpw: Option<f64>, target_size: Option<&str>, params: u64) -> Result<(Budget, String), SearchJobError> {
    match (target_bpw, target_size) {
        (Some(bpw), None) if bpw > 0.0 => Ok((Budget::Tensors((bpw * params as f64 / 8.0) as u64), format!("{bpw} bits per weight"))),
        (None, Some(size)) => {
            let bytes = parse_size_flag("--target-size", size).map_err(SearchJobError::Input)?;
            Ok((Budget::OnDisk(bytes), format!("{size} ({bytes} bytes on disk)")))
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
    /// Affine settings only (no expert kept in mxfp4).
    pub affine_only: bool,
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
    /// The recipe's tensor bytes as `plan` computes them.
    pub bytes: u64,
    /// Its converted files on disk, as `plan` counts them.
    pub on_disk: OnDisk,
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
/// An on-disk budget is met by searching the tensor bytes it leaves after the other files and
/// tightening by the excess until the written recipe's files, as `plan` counts them, fit.
pub fn search_recipe(r: &SearchRequest<'_>) -> Result<SearchedRecipe, SearchJobError> {
    let sens = Sensitivity::read(r.sensitivity)?;
    let (config, files) = SourceFiles::resolve(r.source, true)?;
    check_architecture(&sens, r.sensitivity, &config, r.source)?;
    let keep = keep_classes(r.keep_bf16)?;
    let problem = Problem::new(&sens, &config, &SearchOptions { min_bits: r.min_bits, keep: keep.clone(), affine_only: r.affine_only })?;
    let (budget, target_label) = target_bytes(r.target_bpw, r.target_size, problem.params)?;
    let target = budget.bytes();
    let all_bf16 = problem.bf16_bytes();
    if target >= all_bf16 {
        return Err(SearchJobError::Input(format!(
            "target {target_label} is at or above the model's size with every unit in bf16 ({all_bf16} bytes, {:.3} bits per weight): nothing would be quantized; pick a smaller target",
            mixq_loader::bits_per_weight(all_bf16 as usize, problem.params as usize)
        )));
    }
    let name = r.name.map(str::to_string).unwrap_or_else(|| stem(r.out, "searched"));
    let sens_label = r.sensitivity.display().to_string();
    let render = |allot: &Allotment, refined: Option<&str>| -> Result<Written, SearchJobError> {
        written(&config, &files, r.out, allot, |on_disk| {
            let header = RecipeHeader { name: &name, sensitivity_path: &sens_label, target: &target_label, on_disk, refined };
            write_recipe(&problem, &sens, allot, &header, &keep)
        })
    };
    let mut tensor_budget = target;
    let mut found = None;
    for _ in 0..MAX_TIGHTENING {
        let allot = match problem.solve(tensor_budget) {
            Ok(a) => a,
            Err(SearchError::TooSmall { minimum, bpw, min_bits, .. }) => {
                let minimum = match budget {
                    Budget::Tensors(_) => minimum,
                    Budget::OnDisk(_) => render(&problem.smallest(), None)?.on_disk.total(),
                };
                return Err(SearchError::TooSmall { target, minimum, bpw, min_bits }.into());
            }
            Err(e) => return Err(e.into()),
        };
        // Refinement measures candidates within the same tensor budget, so a tightening round
        // refines again.
        let (allot, refined) = match r.refine {
            Some(refine) => {
                let (a, line) = refine(&sens, &problem, allot, tensor_budget).map_err(SearchJobError::Refine)?;
                (a, Some(line))
            }
            None => (allot, None),
        };
        let w = render(&allot, refined.as_deref())?;
        let spent = budget.spent(allot.bytes, &w.on_disk);
        if spent <= target {
            found = Some((allot, w, refined));
            break;
        }
        tensor_budget = tensor_budget.saturating_sub(spent - target);
    }
    let Some((allot, w, refined)) = found else {
        return Err(SearchJobError::Input(format!("internal error: no allocation's files fit {target_label} after {MAX_TIGHTENING} tightenings")));
    };
    std::fs::write(r.out, &w.text).map_err(|e| SearchJobError::Write(r.out.to_path_buf(), e))?;
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
    Ok(SearchedRecipe {
        target,
        target_label,
        bytes: allot.bytes,
        on_disk: w.on_disk,
        bits_per_weight: bpw(allot.bytes),
        cost: allot.cost,
        refined,
        cost_kind: sens.cost_kind,
        frontier,
        svg,
    })
}

/// Searches with a tighter tensor budget at most this many times before giving up: each round
/// takes off what the last one's files were over, and the other files hardly change between rounds.
const MAX_TIGHTENING: usize = 16;

/// A recipe's text as it will be written, and its files on disk.
struct Written {
    text: String,
    on_disk: OnDisk,
}

/// The recipe `text_for` writes for an allotment, checked against the plan, with the files its
/// conversion puts on disk. The text states that size, which the manifest (holding the text)
/// depends on, so the text is rendered again until the figure it states is the one it has.
fn written(config: &GptOssConfig, files: &SourceFiles, out: &Path, allot: &Allotment, text_for: impl Fn(u64) -> String) -> Result<Written, SearchJobError> {
    let origin = out.display().to_string();
    let mut stated = 0;
    for _ in 0..4 {
        let text = text_for(stated);
        let (recipe, alloc): (Recipe, _) = check_recipe(&text, &origin, config, allot).map_err(SearchJobError::Input)?;
        let disk = on_disk(config, &alloc, &recipe, files);
        if disk.total() == stated {
            return Ok(Written { text, on_disk: disk });
        }
        stated = disk.total();
    }
    Err(SearchJobError::Input("internal error: the recipe's stated size on disk does not settle".into()))
}

/// The file stem of `path`, or `fallback`.
fn stem(path: &Path, fallback: &str) -> String {
    path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| fallback.into())
}
