//! The `plan` and `convert` jobs from command-line arguments: resolving the source and the
//! recipe, then sizing or converting.

use std::path::Path;

use mixq_loader::source::{resolve_source, Need, ResolvedSource};
use mixq_loader::LoaderError;

use crate::writer::convert::{convert, ConvertOptions, ConvertReport, Progress};
use crate::error::ConvertError;
use crate::recipe::plan::{source_size, Allocation, PlanSummary, SourceSize};
use crate::recipe::language::{Recipe, RecipeError};
use crate::writer::on_disk::{on_disk, OnDisk, SourceFiles};

/// Anything that stops a plan or a conversion job.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// The source could not be resolved or read.
    #[error(transparent)]
    Loader(#[from] LoaderError),
    /// The recipe could not be loaded or does not fit the model.
    #[error(transparent)]
    Recipe(#[from] RecipeError),
    /// The conversion failed.
    #[error(transparent)]
    Convert(#[from] ConvertError),
    /// The source is a bare config file where the job needs weights.
    #[error("{0}: converting needs a checkpoint folder, not a bare config file")]
    NotAFolder(String),
}

/// A plan: the recipe, its summary, and the source's (bytes, parameters).
pub struct Plan {
    /// The recipe, loaded.
    pub recipe: Recipe,
    /// Sizes per setting and totals.
    pub summary: PlanSummary,
    /// The source checkpoint's layout, bytes and parameters.
    pub source_size: SourceSize,
    /// Recipe rules that decide nothing here, each naming its line.
    pub unused_rules: Vec<String>,
    /// The converted model's files on disk.
    pub on_disk: OnDisk,
}

/// Plans `recipe` (a name or YAML path) on `source` (folder, repo id or config.json), reading no
/// weight: the source's layout comes from a folder's tensor headers, else from its config alone;
/// `show_downloads` reports a hub download on stderr.
pub fn plan_source(source: &str, recipe: &str, show_downloads: bool) -> Result<Plan, JobError> {
    let recipe = Recipe::load(recipe)?;
    let (config, files) = SourceFiles::resolve(source, show_downloads)?;
    let alloc = Allocation::resolve(&config, &recipe)?;
    let unused_rules = alloc.unused_rules(&recipe);
    let on_disk = on_disk(&config, &alloc, &recipe, &files);
    let source_size = source_size(&config, files.layout);
    Ok(Plan { summary: alloc.summary(), recipe, source_size, unused_rules, on_disk })
}

/// A finished conversion job.
pub struct ConvertRun {
    /// What the writer reports.
    pub report: ConvertReport,
    /// The recipe's name.
    pub recipe_name: String,
    /// Wall time of the conversion itself, in seconds.
    pub seconds: f64,
}

impl ConvertRun {
    /// Source bytes read per second, in MiB/s.
    pub fn source_mib_per_second(&self) -> f64 {
        self.report.source_bytes as f64 / 1048576.0 / self.seconds.max(1e-9)
    }
}

/// Loads `recipe`, resolves the checkpoint folder `source` and converts it to `out`.
pub fn convert_source(source: &str, recipe: &str, out: &Path, opts: &ConvertOptions, progress: &dyn Progress) -> Result<ConvertRun, JobError> {
    let recipe = Recipe::load(recipe)?;
    let ResolvedSource::Folder(dir) = resolve_source(source, Need::Everything, opts.show_downloads)? else {
        return Err(JobError::NotAFolder(source.to_string()));
    };
    let start = std::time::Instant::now();
    let result = convert(&dir, &recipe, out, opts, progress);
    let seconds = start.elapsed().as_secs_f64();
    Ok(ConvertRun { report: result?, recipe_name: recipe.name, seconds })
}
