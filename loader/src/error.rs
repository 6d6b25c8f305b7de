//! Errors of the loader.

use std::path::PathBuf;

/// Anything that can go wrong while finding, opening or reading a checkpoint.
#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    /// An I/O failure on a named file.
    #[error("{path}: {error}")]
    Io {
        /// The file or folder involved.
        path: PathBuf,
        /// The underlying error (in the message, not chained, so it is printed once).
        error: std::io::Error,
    },
    /// config.json is missing a field or has one of the wrong kind.
    #[error("{path}: {message}")]
    Config {
        /// The config file.
        path: PathBuf,
        /// What is wrong, naming the field.
        message: String,
    },
    /// A safetensors header or data section is malformed.
    #[error("{path}: {message}")]
    Shard {
        /// The shard file.
        path: PathBuf,
        /// What is wrong, naming the tensor where there is one.
        message: String,
    },
    /// The shard index disagrees with the shards.
    #[error("{path}: {message}")]
    Index {
        /// The index file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A tensor is missing or does not have the shape or dtype its role needs.
    #[error("tensor {name}: {message}")]
    Tensor {
        /// The tensor's name.
        name: String,
        /// What was expected and what was found.
        message: String,
    },
    /// The source could not be resolved to a folder (bad path, hub failure).
    #[error("source {source_name}: {message}")]
    Source {
        /// The source as given.
        source_name: String,
        /// Why it could not be resolved.
        message: String,
    },
}

impl LoaderError {
    /// Wraps an I/O error with the path it happened on.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        LoaderError::Io { path: path.into(), error: source }
    }

    /// A tensor-level error.
    pub fn tensor(name: impl Into<String>, message: impl Into<String>) -> Self {
        LoaderError::Tensor { name: name.into(), message: message.into() }
    }
}

/// Result with a [`LoaderError`].
pub type Result<T, E = LoaderError> = std::result::Result<T, E>;
