//! Errors of the runtime.

/// Anything that stops loading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The checkpoint could not be read.
    #[error(transparent)]
    Loader(#[from] mixq_loader::LoaderError),
    /// Config and tensors disagree, or a tensor has an unusable format.
    #[error("{0}")]
    Checkpoint(String),
    /// A token id is outside the vocabulary.
    #[error("token id {id} at position {position} is outside the vocabulary of {vocab} tokens")]
    TokenOutOfRange {
        /// The id.
        id: u32,
        /// Its position in the input.
        position: usize,
        /// Vocabulary size.
        vocab: usize,
    },
    /// The input does not fit the context.
    #[error("{tokens} tokens exceed the model's context of {context} tokens")]
    ContextExceeded {
        /// Tokens requested.
        tokens: usize,
        /// The limit.
        context: usize,
    },
    /// No usable GPU adapter.
    #[error("{0}")]
    NoGpu(String),
    /// The GPU does not have the memory (or buffer size) a model or session needs.
    #[error("not enough GPU memory: {0}")]
    GpuMemory(String),
    /// The GPU reported an error while running.
    #[error("GPU error: {0}")]
    Gpu(String),
    /// Tokenizer or chat template problems.
    #[error("{0}")]
    Text(String),
}

/// Result with a [`RuntimeError`].
pub type Result<T, E = RuntimeError> = std::result::Result<T, E>;
