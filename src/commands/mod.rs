//! One module per command: its arguments (a clap `Args` struct) and the one function that runs it.

pub mod adapters;
pub mod calibrate;
pub mod convert;
pub mod demo;
pub mod inspect;
pub mod logits;
pub mod plan;
pub mod publish;
pub mod recipe_search;
pub mod recipes;
pub mod run;
pub mod sensitivity;
pub mod synth;
pub mod validate;
pub mod verify;
