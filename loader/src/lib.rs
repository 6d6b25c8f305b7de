//! mixq-loader: finds a gpt-oss checkpoint (local folder or hub repo id), validates and
//! memory-maps its shards, and decodes MXFP4 and BF16 tensors; it holds the model schema (every
//! parameter and where it comes from) and the storage formats, defined once.

pub mod calibration;
pub mod checkpoint;
pub mod config;
pub mod decode;
pub mod dtype;
pub mod error;
pub mod file_name;
pub mod format;
pub mod hub_upload;
pub mod layout;
pub mod mlx_layout;
pub mod rowmap;
pub mod schema;
pub mod shard;
pub mod source;

pub use calibration::{Calibration, ModelFingerprint, StatTensor};
pub use checkpoint::{Checkpoint, CheckpointFormat, TensorRef, INDEX_FILE};
pub use config::{GptOssConfig, LayerType, QuantMode, QuantSpec, QuantizationMap, RopeScaling};
pub use dtype::{Dtype, FloatDtype};
pub use format::{bits_per_weight, QuantFormat, TensorSpec};
pub use schema::{classify_name, mlx_params, InputSite, Param, SourceLayout, TensorClass, UpstreamRows};
pub use rowmap::RowMap;
pub use error::{LoaderError, Result};
pub use shard::{ShardFile, TensorInfo};
pub use source::{resolve_source, ResolvedSource};
