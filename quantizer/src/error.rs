//! The error of a conversion, shared by the writer and the parts it calls.

use std::path::{Path, PathBuf};

use mixq_loader::LoaderError;

use crate::recipe::RecipeError;

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
    #[error("{0}: output folder exists and is not empty; pass --force to replace it")]
    OutExists(PathBuf),
    /// The output would replace the source.
    #[error("{0}: output folder is the source checkpoint or contains it")]
    OutIsSource(PathBuf),
    /// The source is not an upstream checkpoint.
    #[error("{path}: convert reads upstream gpt-oss checkpoints (MXFP4 experts); this one is {found}")]
    NotUpstream {
        /// The source folder.
        path: PathBuf,
        /// What it is.
        found: &'static str,
    },
    /// Calibration statistics do not fit the model.
    #[error("{path}: {message}")]
    Calibration {
        /// The statistics file.
        path: PathBuf,
        /// What is wrong, naming the tensor.
        message: String,
    },
    /// A write failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

/// Maps an I/O error on `path` to a [`ConvertError`].
pub(crate) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ConvertError + '_ {
    move |source| ConvertError::Io { path: path.to_path_buf(), source }
}
