//! mixq-runtime: runs gpt-oss checkpoints. This crate is a skeleton until the runtime lands;
//! it holds only the one fact the rest of the workspace shares with it.

/// The version of the runtime crate, reported in model cards and validation reports.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
