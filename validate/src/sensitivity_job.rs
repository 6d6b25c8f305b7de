//! The `sensitivity` job: arguments checked, the source chosen (a checkpoint or a config alone),
//! every unit measured, the file written.

use std::path::{Path, PathBuf};

use mixq_loader::GptOssConfig;
use mixq_quantizer::authoring::sensitivity_file::Sensitivity;
use mixq_quantizer::QuantMethod;

use crate::sensitivity::{check_settings, sensitivity, SensitivityOptions, SensitivitySource};
use crate::validate_job::Loader;
use crate::ValidateError;

/// Anything that stops a sensitivity job.
#[derive(Debug, thiserror::Error)]
pub enum SensitivityJobError {
    /// The measurement failed or an argument is unusable.
    #[error(transparent)]
    Validate(#[from] ValidateError),
    /// The sensitivity file could not be written.
    #[error("writing {0}")]
    Write(PathBuf, #[source] std::io::Error),
}

/// What `sensitivity` is asked for.
pub struct SensitivityRequest<'a> {
    /// The source checkpoint (upstream MXFP4 or transformers' dense layout).
    pub model: Option<&'a Path>,
    /// A config.json alone (synthetic weights, proxy costs).
    pub synthetic_config: Option<&'a Path>,
    /// Text to measure KL on.
    pub text: Option<&'a Path>,
    /// Calibration statistics weighting the proxy.
    pub calibration: Option<&'a Path>,
    /// Bit widths to measure.
    pub bits: &'a [u32],
    /// Group sizes to measure.
    pub group_sizes: &'a [u32],
    /// Tokens of the text the KL is measured on.
    pub tokens: usize,
    /// Window length.
    pub ctx: usize,
    /// Tokens the model writes itself for the cheap estimate (0: none).
    pub probe_tokens: usize,
    /// The quantizer the settings are made with.
    pub quantizer: QuantMethod,
    /// `--measure`: BITS,GROUP_SIZE or two of them.
    pub measure: &'a [u32],
    /// The file to write.
    pub out: &'a Path,
    /// Opens the model the KL is measured on (on the CPU or the GPU).
    pub load: &'a Loader<'a, ValidateError>,
}

/// A setting (bits, group size).
pub type Setting = (u32, u32);

/// The reference setting and the optional second one of `--measure`.
pub fn measured_settings(measure: &[u32]) -> Result<(Setting, Option<Setting>), ValidateError> {
    match measure {
        [b, g] => Ok(((*b, *g), None)),
        [b, g, b2, g2] => Ok(((*b, *g), Some((*b2, *g2)))),
        _ => Err(ValidateError::Input("--measure takes BITS,GROUP_SIZE or two of them (e.g. 3,64,5,64)".into())),
    }
}

/// Measures every unit's sensitivity and writes the file; `progress(units_done, units_total)`.
pub fn sensitivity_job(r: &SensitivityRequest<'_>, progress: &(dyn Fn(usize, usize) + Sync)) -> Result<Sensitivity, SensitivityJobError> {
    check_settings(r.bits, r.group_sizes)?;
    let (reference, second) = measured_settings(r.measure)?;
    let opts = SensitivityOptions {
        bits: r.bits.to_vec(),
        group_sizes: r.group_sizes.to_vec(),
        quantizer: r.quantizer,
        reference,
        second,
        tokens: r.tokens,
        ctx: r.ctx,
        probe_tokens: r.probe_tokens,
    };
    let config;
    let (source, label) = match (r.model, r.synthetic_config) {
        (Some(dir), _) => (SensitivitySource::Checkpoint { dir, load: r.load, text: r.text, calibration: r.calibration }, dir.display().to_string()),
        (None, Some(path)) => {
            config = GptOssConfig::from_file(path).map_err(ValidateError::from)?;
            (SensitivitySource::Synthetic(&config), format!("synthetic weights shaped as {}", path.display()))
        }
        _ => return Err(ValidateError::Input("give --model DIR, or --synthetic-config CONFIG".into()).into()),
    };
    let s = sensitivity(&source, &label, &opts, progress)?;
    s.write(r.out).map_err(|e| SensitivityJobError::Write(r.out.to_path_buf(), e))?;
    Ok(s)
}
