//! mixq-runtime: runs gpt-oss checkpoints (upstream MXFP4, MLX affine or mxfp4, BF16) with
//! weights kept packed: on the CPU straight from the memory map, or on the GPU through wgpu
//! (Metal, Vulkan, DX12); forward pass, KV cache, sampling, tokenizer and chat template.

pub mod attention;
pub mod cache;
pub mod engine;
pub mod error;
pub mod generate;
pub mod gpu;
pub mod jobs;
pub mod matrix;
pub mod model;
pub mod npy;
pub mod observe;
pub mod residual;
pub mod rope;
pub mod sample;
pub mod text;

pub use cache::KvCache;
pub use engine::{Backend, Engine};
pub use error::{Result, RuntimeError};
pub use generate::{generate, GenerationStats};
pub use model::Model;
pub use observe::{ActivationObserver, InputSite};
pub use sample::{Sampler, SamplerConfig};
pub use text::TextCodec;

/// The version of the runtime crate, reported in model cards and validation reports.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
