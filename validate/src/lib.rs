//! mixq-validate: measures a converted model against its source. This crate is a skeleton
//! until the validator lands.

/// The version of the validator crate, reported in model cards.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
