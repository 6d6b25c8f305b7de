//! The error of a conversion, shared by the writer and the parts it calls.

use std::path::{Path, PathBuf};

use mixq_loader::LoaderError;

use crate::recipe::language::RecipeError;
use crate::sizes::human_bytes;

/// Anything that stops a conversion.
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    /// The source could not be read.
    #[error(transparent)]
    Loader(#[from] LoaderError),
    /// The recipe does not fit the model.
    #[error(transparent)]
    Recipe(#[from] RecipeError),
    /// A weight holds NaN or Inf.
    #[error("tensor {tensor}: non-finite value {value} at row {row}, column {col}; refusing to quantize it")]
    NonFinite {
        /// Source tensor name.
        tensor: String,
        /// Output row.
        row: usize,
        /// Column within the row.
        col: usize,
        /// The value.
        value: f32,
    },
    /// The output folder exists and is not empty.
    #[error("{0}: output folder exists and is not empty; pass --force to replace it (a mixq output only)")]
    OutExists(PathBuf),
    /// The output would replace the source.
    #[error("{0}: output folder is the source checkpoint or contains it")]
    OutIsSource(PathBuf),
    /// The source is neither an upstream nor a transformers dense checkpoint.
    #[error("{path}: convert reads upstream gpt-oss checkpoints (MXFP4 experts) and transformers' dense layout (fine-tunes); this one is {found}")]
    NotUpstream {
        /// The source folder.
        path: PathBuf,
        /// What it is.
        found: &'static str,
    },
    /// A dense expert row cannot be encoded as MXFP4.
    #[error("tensor {tensor}: output row {row}: {error}; refusing to encode it as MXFP4")]
    Mxfp4 {
        /// The parameter being encoded.
        tensor: String,
        /// Output row.
        row: usize,
        /// What is wrong with the row.
        error: crate::kernels::mxfp4::Mxfp4Error,
    },
    /// A unit's quantization was asked for in bf16, which is no quantized format.
    #[error("tensor {0}: a unit is quantized to affine or mxfp4; bf16 is kept, not quantized")]
    NotQuantized(String),
    /// Calibration statistics do not fit the model.
    #[error("{path}: {message}")]
    Calibration {
        /// The statistics file.
        path: PathBuf,
        /// What is wrong, naming the tensor.
        message: String,
    },
    /// A module's quantizer is `gptq` but the statistics hold no Hessians.
    #[error("{module}: the gptq quantizer feeds rounding errors through the input Hessians, and {}; run mixq calibrate --hessian, or pick --quantizer mse", match calibration { Some(p) => format!("{} holds none (it was calibrated without --hessian)", p.display()), None => "no --calibration was given".to_string() })]
    NeedsHessians {
        /// The first module that would use gptq.
        module: String,
        /// The statistics given, if any.
        calibration: Option<PathBuf>,
    },
    /// Another conversion holds the output's lock.
    #[error("{out}: another mixq convert ({holder}) is writing this output (lock {lock}); wait for it or pick another --out")]
    Busy {
        /// The output folder.
        out: PathBuf,
        /// The lock file.
        lock: PathBuf,
        /// Who holds it.
        holder: String,
    },
    /// The output's filesystem has too little free space for the plan.
    #[error("{path}: not enough free space: the conversion needs {} more, the filesystem has {}; free space or pick another --out (--no-space-check skips this check)", human_bytes(*needed), human_bytes(*available))]
    NoSpace {
        /// Where the output is written.
        path: PathBuf,
        /// Bytes still to write.
        needed: u64,
        /// Bytes free.
        available: u64,
    },
    /// The disk filled (or a file-size limit was hit) while writing.
    #[error("{path}: out of space while writing ({error}); the conversion needs {} in all; free space and rerun (with --resume to keep the finished shards)", human_bytes(*needed))]
    DiskFull {
        /// The file being written.
        path: PathBuf,
        /// Bytes the whole output needs.
        needed: u64,
        /// The error.
        error: std::io::Error,
    },
    /// A source file changed while it was read.
    #[error("{path}: the source changed while converting: {what}; nothing was written to the output; rerun when the source is complete")]
    SourceChanged {
        /// The source file.
        path: PathBuf,
        /// What changed.
        what: String,
    },
    /// A partial output cannot be resumed.
    #[error("{partial}: cannot resume: {why}")]
    CannotResume {
        /// The partial folder.
        partial: PathBuf,
        /// Why not.
        why: String,
    },
    /// A manifest could not be updated.
    #[error("{path}: {message}")]
    Manifest {
        /// The manifest.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// `--out` is a file, not a folder.
    #[error("{0}: --out is a regular file; convert writes a folder: pick a folder path (the file is left alone)")]
    OutIsFile(PathBuf),
    /// `--force` would delete a folder that holds something other than a mixq output.
    #[error("{path}: --force replaces only an empty folder or a mixq output (one with mixq-manifest.json); this folder holds {what}, which it would delete; remove it yourself or pick another --out")]
    OutNotOurs {
        /// The output folder.
        path: PathBuf,
        /// What it holds (a count and the first names).
        what: String,
    },
    /// A write failed.
    #[error("{path}: {error}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The error (in the message, not chained, so it is printed once).
        error: std::io::Error,
    },
}

/// Maps an I/O error on `path` to a [`ConvertError`].
pub(crate) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ConvertError + '_ {
    move |error| ConvertError::Io { path: path.to_path_buf(), error }
}
