//! A checkpoint folder: config, shard index and memory-mapped shards.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::config::GptOssConfig;
use crate::dtype::{Dtype, FloatDtype};
use crate::error::{LoaderError, Result};
use crate::schema::SourceLayout;
use crate::shard::{ShardFile, TensorInfo};

/// Name of the shard index file.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// What kind of checkpoint a folder holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckpointFormat {
    /// Hugging Face gpt-oss: MXFP4 expert blocks/scales, BF16 elsewhere.
    UpstreamMxfp4,
    /// MLX checkpoint with a `quantization` map in config.json.
    MlxQuantized,
    /// transformers' `save_pretrained` of a dequantized gpt-oss (fine-tunes): dense transposed
    /// experts (`mlp.experts.gate_up_proj` and `down_proj`), every tensor in one float type.
    TransformersDense(FloatDtype),
    /// Unquantized weights.
    Unquantized,
}

impl CheckpointFormat {
    /// A short human name.
    pub fn describe(self) -> &'static str {
        match self {
            CheckpointFormat::UpstreamMxfp4 => "upstream gpt-oss (MXFP4 experts, BF16 rest)",
            CheckpointFormat::MlxQuantized => "MLX quantized",
            CheckpointFormat::TransformersDense(FloatDtype::BF16) => "transformers dense gpt-oss (fine-tune layout: dense transposed experts, BF16)",
            CheckpointFormat::TransformersDense(FloatDtype::F16) => "transformers dense gpt-oss (fine-tune layout: dense transposed experts, F16)",
            CheckpointFormat::TransformersDense(FloatDtype::F32) => "transformers dense gpt-oss (fine-tune layout: dense transposed experts, F32)",
            CheckpointFormat::Unquantized => "unquantized",
        }
    }

    /// The layout of a source checkpoint convert reads (`None` for MLX and other unquantized ones).
    pub fn source_layout(self) -> Option<SourceLayout> {
        match self {
            CheckpointFormat::UpstreamMxfp4 => Some(SourceLayout::Mxfp4),
            CheckpointFormat::TransformersDense(f) => Some(SourceLayout::Dense(f)),
            CheckpointFormat::MlxQuantized | CheckpointFormat::Unquantized => None,
        }
    }
}

/// A borrowed view of one tensor.
#[derive(Debug, Clone, Copy)]
pub struct TensorRef<'a> {
    /// Tensor name.
    pub name: &'a str,
    /// Dtype, shape and offsets.
    pub info: &'a TensorInfo,
    /// The raw little-endian bytes.
    pub data: &'a [u8],
    /// The shard holding it.
    pub shard: &'a Path,
}

impl TensorRef<'_> {
    /// Checks that the tensor has the dtype and shape its role needs.
    pub fn expect(&self, dtype: Dtype, shape: &[usize]) -> Result<()> {
        if self.info.dtype != dtype {
            return Err(LoaderError::tensor(
                self.name,
                format!("expected dtype {dtype} for its role, found {} (in {})", self.info.dtype, self.shard.display()),
            ));
        }
        if self.info.shape != shape {
            return Err(LoaderError::tensor(
                self.name,
                format!("expected shape {shape:?}, found {:?} (in {})", self.info.shape, self.shard.display()),
            ));
        }
        Ok(())
    }

    /// Checks that the tensor is a float tensor (BF16, F16 or F32: how mlx-lm may store weights,
    /// scales, biases and vectors) of the shape its role needs, and returns its float type.
    pub fn expect_float(&self, shape: &[usize]) -> Result<FloatDtype> {
        let dtype = FloatDtype::of(self.info.dtype).ok_or_else(|| {
            LoaderError::tensor(
                self.name,
                format!("expected a float dtype (BF16, F16 or F32) for its role, found {} (in {})", self.info.dtype, self.shard.display()),
            )
        })?;
        self.expect(self.info.dtype, shape)?;
        Ok(dtype)
    }
}

/// A checkpoint folder whose shards are open and consistent with its index.
#[derive(Debug)]
pub struct Checkpoint {
    dir: PathBuf,
    config: GptOssConfig,
    shards: Vec<ShardFile>,
    tensors: BTreeMap<String, usize>,
    index: Option<Value>,
}

impl Checkpoint {
    /// Opens a folder: parses config.json, maps every shard and checks the index against them.
    pub fn open(dir: &Path) -> Result<Self> {
        let config = GptOssConfig::from_file(&dir.join("config.json"))?;
        let index_path = dir.join(INDEX_FILE);
        let (shard_names, weight_map, index) = if index_path.exists() {
            let text = std::fs::read_to_string(&index_path).map_err(|e| LoaderError::io(&index_path, e))?;
            let bad = |message: String| LoaderError::Index { path: index_path.clone(), message };
            let index: Value = serde_json::from_str(&text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
            let map = index
                .get("weight_map")
                .and_then(Value::as_object)
                .ok_or_else(|| bad("missing object `weight_map`".into()))?;
            let mut weight_map = BTreeMap::new();
            let mut names = Vec::new();
            for (tensor, shard) in map {
                let shard = shard.as_str().ok_or_else(|| bad(format!("weight_map[{tensor}] is not a file name")))?;
                if shard.contains('/') || shard.contains('\\') || shard.starts_with('.') {
                    return Err(bad(format!("weight_map[{tensor}] names \"{shard}\", which is not a plain file name")));
                }
                if !names.iter().any(|n: &String| n == shard) {
                    if !dir.join(shard).is_file() {
                        return Err(bad(format!("weight_map[{tensor}] names shard {shard}, which does not exist")));
                    }
                    names.push(shard.to_string());
                }
                weight_map.insert(tensor.clone(), shard.to_string());
            }
            names.sort();
            (names, Some(weight_map), Some(index))
        } else if dir.join("model.safetensors").is_file() {
            (vec!["model.safetensors".to_string()], None, None)
        } else {
            return Err(LoaderError::Index {
                path: dir.to_path_buf(),
                message: format!("no {INDEX_FILE} and no model.safetensors"),
            });
        };
        let mut shards = Vec::with_capacity(shard_names.len());
        let mut tensors = BTreeMap::new();
        for (i, name) in shard_names.iter().enumerate() {
            let shard = ShardFile::open(&dir.join(name))?;
            for tensor in shard.tensors().keys() {
                if let Some(prev) = tensors.insert(tensor.clone(), i) {
                    return Err(LoaderError::Shard {
                        path: shard.path().to_path_buf(),
                        message: format!("tensor {tensor} is also in {}", shard_names[prev]),
                    });
                }
            }
            shards.push(shard);
        }
        if let Some(weight_map) = weight_map {
            let bad = |message: String| LoaderError::Index { path: index_path.clone(), message };
            for (tensor, shard) in &weight_map {
                match tensors.get(tensor) {
                    None => return Err(bad(format!("tensor {tensor} is listed in {shard} but no shard holds it"))),
                    Some(&i) if shard_names[i] != *shard => {
                        return Err(bad(format!("tensor {tensor} is listed in {shard} but lies in {}", shard_names[i])))
                    }
                    _ => {}
                }
            }
            if let Some(extra) = tensors.keys().find(|t| !weight_map.contains_key(*t)) {
                return Err(bad(format!("tensor {extra} is in {} but not in the index", shard_names[tensors[extra]])));
            }
        }
        Ok(Checkpoint { dir: dir.to_path_buf(), config, shards, tensors, index })
    }

    /// The folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The parsed config.json.
    pub fn config(&self) -> &GptOssConfig {
        &self.config
    }

    /// The open shards, sorted by file name.
    pub fn shards(&self) -> &[ShardFile] {
        &self.shards
    }

    /// The parsed index file, when the checkpoint has one.
    pub fn index(&self) -> Option<&Value> {
        self.index.as_ref()
    }

    /// Names of all tensors, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// Whether a tensor exists.
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// Looks up a tensor, failing with its name when it is missing.
    pub fn tensor(&self, name: &str) -> Result<TensorRef<'_>> {
        let (key, &i) = self
            .tensors
            .get_key_value(name)
            .ok_or_else(|| LoaderError::tensor(name, format!("missing from the checkpoint in {}", self.dir.display())))?;
        let shard = &self.shards[i];
        let info = &shard.tensors()[name];
        Ok(TensorRef { name: key, info, data: shard.bytes(info), shard: shard.path() })
    }

    /// Drops resident pages of consumed tensor data (see [`ShardFile::release`]).
    pub fn release(&self, slice: &[u8]) {
        for shard in &self.shards {
            shard.release(slice);
        }
    }

    /// The kind of checkpoint, from its config and tensors.
    pub fn format(&self) -> CheckpointFormat {
        if self.config.quantization.is_some() {
            CheckpointFormat::MlxQuantized
        } else if self.tensors.keys().any(|k| k.ends_with("_blocks")) {
            CheckpointFormat::UpstreamMxfp4
        } else if let Some(f) = self.dense_experts_dtype() {
            CheckpointFormat::TransformersDense(f)
        } else {
            CheckpointFormat::Unquantized
        }
    }

    /// The float type of transformers' dense expert tensors (`mlp.experts.gate_up_proj`), when the
    /// checkpoint has them.
    fn dense_experts_dtype(&self) -> Option<FloatDtype> {
        let name = self.tensors.keys().find(|k| k.ends_with(".mlp.experts.gate_up_proj"))?;
        let shard = &self.shards[self.tensors[name]];
        FloatDtype::of(shard.tensors()[name.as_str()].dtype)
    }

    /// Total bytes of tensor data.
    pub fn tensor_bytes(&self) -> u64 {
        self.shards.iter().flat_map(|s| s.tensors().values()).map(|t| (t.end - t.begin) as u64).sum()
    }
}
