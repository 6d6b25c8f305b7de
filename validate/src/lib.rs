//! mixq-validate: perplexity of a model on a text under sliding windows, and KL divergence, top-1
//! agreement, perplexity ratio and Δp against a reference model or its saved logits; publish gates
//! and the model-card section that records them.

pub mod calibrate;
pub mod calibrate_job;
pub mod card;
pub mod corpus;
pub mod estimate;
pub mod eval;
pub mod projection;
pub mod reference;
pub mod refine;
pub mod sensitivity;
pub mod sensitivity_job;
pub mod stats;
pub mod validate_job;
pub mod windows;

use std::path::PathBuf;

pub use calibrate::{calibrate, CalibrateOptions, CalibrationRun};
pub use corpus::Corpus;
pub use eval::{score, EvalOptions, Reference};
pub use stats::{Gates, Summary};

/// The version of the validator crate, reported in model cards.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Anything that stops a validation.
#[derive(Debug, thiserror::Error)]
pub enum ValidateError {
    /// The model failed to run.
    #[error(transparent)]
    Runtime(#[from] mixq_runtime::RuntimeError),
    /// A saved reference is unusable.
    #[error("{0}")]
    Reference(String),
    /// A checkpoint could not be read.
    #[error(transparent)]
    Loader(#[from] mixq_loader::LoaderError),
    /// A weight could not be quantized, or calibration statistics do not fit the model.
    #[error(transparent)]
    Quantize(#[from] mixq_quantizer::ConvertError),
    /// An argument or input file is unusable.
    #[error("{0}")]
    Input(String),
    /// The caller's loader could not open the model on its backend (its message, causes included).
    #[error("{0}")]
    Backend(String),
    /// A file could not be read or written.
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
}

/// sha256 of token ids (little-endian u32s), identifying the text a reference was computed on.
pub fn tokens_sha256(tokens: &[u32]) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for t in tokens {
        h.update(t.to_le_bytes());
    }
    format!("{:x}", h.finalize())
}
