//! A text file read for a job on a model: its bytes hashed once, checked as UTF-8, and tokenized
//! with the model's tokenizer.

use std::path::Path;

use mixq_runtime::TextCodec;
use sha2::{Digest, Sha256};

use crate::ValidateError;

/// The tokens of a text file and the sha256 of its bytes.
#[derive(Debug, Clone)]
pub struct Corpus {
    /// Token ids, truncated to the requested count.
    pub tokens: Vec<u32>,
    /// sha256 of the file as read.
    pub sha256: String,
}

impl Corpus {
    /// Reads `text`, hashes it and tokenizes it with the tokenizer of the model in `model_dir`,
    /// keeping at most `max_tokens` tokens.
    pub fn read(model_dir: &Path, text: &Path, max_tokens: Option<usize>) -> Result<Self, ValidateError> {
        let raw = std::fs::read(text).map_err(|e| ValidateError::Io(text.to_path_buf(), e))?;
        let sha256 = format!("{:x}", Sha256::digest(&raw));
        let body = String::from_utf8(raw).map_err(|_| ValidateError::Input(format!("{}: not UTF-8 text", text.display())))?;
        let mut tokens = TextCodec::load(model_dir)?.encode(&body)?;
        if let Some(n) = max_tokens {
            tokens.truncate(n);
        }
        Ok(Corpus { tokens, sha256 })
    }
}
