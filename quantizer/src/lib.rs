//! mixq-quantizer: YAML recipes, size plans from config.json alone, MLX-exact affine
//! quantization, and the streaming writer of MLX checkpoints (shards, index, config, manifest,
//! model card), plus inspection and verification of what it wrote.

pub mod affine;
pub mod card;
pub mod convert;
pub mod converted_config;
pub mod error;
pub mod fault;
pub mod hash;
pub mod importance;
pub mod inspect;
pub mod jobs;
pub mod manifest;
pub mod modules;
pub mod plan;
pub mod provenance;
pub mod recipe;
pub mod recipe_search;
pub mod rows;
pub mod search;
pub mod search_job;
pub mod sensitivity;
pub mod source_watch;
pub mod staging;
pub mod unit;
pub mod units;
pub mod verify;

pub use error::ConvertError;
pub use convert::{convert, ConvertOptions, ConvertReport, NoProgress, Progress};
pub use modules::TensorClass;
pub use plan::{Allocation, PlanSummary};
pub use recipe::{Action, Recipe, RecipeError, BUILTIN_RECIPES};
pub use search::QuantMethod;
