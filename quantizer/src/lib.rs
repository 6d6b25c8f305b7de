//! mixq-quantizer: applies recipes to gpt-oss models and writes MLX checkpoints. Four module
//! trees, each one job, depending one way (recipe ← kernels ← writer, recipe ← authoring):
//! [`recipe`] (the language and the plan), [`kernels`] (minmax, mse, packing), [`writer`] (the
//! crash-safe streaming conversion, manifest, card, inspect and verify) and [`authoring`]
//! (sensitivity files, recipe search, frontier).

// The crash-safe writer uses positioned writes, flock, statvfs and inode numbers: Unix only
// (Linux, macOS). Windows is out of scope; say so at build time rather than with odd errors.
#[cfg(not(unix))]
compile_error!("mixq-quantizer builds on Unix only (Linux, macOS): its writer uses positioned writes, flock and statvfs");

pub mod authoring;
pub mod error;
pub mod kernels;
pub mod recipe;
pub mod sizes;
pub mod writer;

pub use error::ConvertError;
pub use kernels::method::QuantMethod;
pub use mixq_loader::TensorClass;
pub use recipe::language::{QuantFormat, Recipe, RecipeError, BUILTIN_RECIPES};
pub use recipe::plan::{Allocation, PlanSummary};
pub use writer::convert::{convert, ConvertOptions, ConvertReport, NoProgress, Progress};
