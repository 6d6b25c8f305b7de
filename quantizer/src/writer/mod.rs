//! The crash-safe MLX writer: streaming conversion, staging folder, lock and journal, manifest,
//! model card, and reading back what it wrote (inspect, verify).

pub mod card;
pub mod convert;
pub mod converted_config;
pub mod fault;
pub mod hash;
pub mod inspect;
pub mod jobs;
pub mod manifest;
pub mod on_disk;
pub mod provenance;
pub mod publish;
pub mod rows;
pub mod source_watch;
pub mod staging;
pub mod verify;
