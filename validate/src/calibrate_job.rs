//! The `calibrate` job: the source resolved, the model run over the text, the statistics written,
//! and how many experts the text reached.

use std::path::Path;

use mixq_loader::source::{resolve_source, Need, ResolvedSource};
use mixq_loader::Calibration;

use crate::validate_job::Loader;
use crate::{calibrate, CalibrateOptions, CalibrationRun, ValidateError};

/// A finished calibration job.
pub struct CalibrateJob {
    /// The run and its statistics (written).
    pub run: CalibrationRun,
    /// Experts that saw at least one token, over all layers.
    pub experts_reached: usize,
    /// Experts over all layers.
    pub experts: usize,
}

/// (experts that saw a token, all experts), summed over the layers of `stats`.
pub fn experts_reached(stats: &Calibration) -> (usize, usize) {
    (0..)
        .map_while(|l| stats.expert_tokens(l))
        .map(|c| (c.iter().filter(|&&n| n > 0.0).count(), c.len()))
        .fold((0, 0), |(a, b), (h, n)| (a + h, b + n))
}

/// Calibrates `model` (folder or repo id) on `text`, on the backend `load` opens it on, and
/// writes the statistics to `out`.
pub fn calibrate_source(
    model: &str,
    load: &Loader<'_, ValidateError>,
    text: &Path,
    opts: CalibrateOptions,
    out: &Path,
    progress: &(dyn Fn(usize, usize) + Sync),
) -> Result<CalibrateJob, ValidateError> {
    let ResolvedSource::Folder(dir) = resolve_source(model, Need::Everything, opts.show_downloads)? else {
        return Err(ValidateError::Input(format!("{model}: calibrating needs a checkpoint folder, not a bare config file")));
    };
    let run = calibrate(&dir, load, model, text, opts, progress)?;
    run.stats.write(out)?;
    let (experts_reached, experts) = experts_reached(&run.stats);
    Ok(CalibrateJob { run, experts_reached, experts })
}
