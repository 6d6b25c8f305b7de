//! The recipe language and planning: YAML rules parsed with their line numbers, resolved per
//! parameter of a model, and the sizes that allocation gives, from config.json alone.

pub mod language;
pub mod plan;
