//! The config of a converted model, as a parsed [`GptOssConfig`] (for running a model of that
//! shape without writing it).

use mixq_loader::{GptOssConfig, LoaderError};

use crate::writer::convert::quantized_config;
use crate::recipe::plan::Allocation;

/// The GptOssConfig that converting a model of `config` by `alloc` writes as its config.json.
pub fn converted_config(config: &GptOssConfig, alloc: &Allocation) -> Result<GptOssConfig, LoaderError> {
    GptOssConfig::from_json_str(&quantized_config(config, alloc).to_string(), &config.path)
}
