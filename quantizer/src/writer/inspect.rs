//! `mixq inspect`: what a checkpoint holds, by tensor class.

use std::collections::{BTreeMap, BTreeSet};

use mixq_loader::mlx_layout::param_format;
use mixq_loader::schema::{classify_name, mlx_params, Param, TensorClass};
use mixq_loader::{Checkpoint, CheckpointFormat, LoaderError};

/// Tensors of one class.
#[derive(Debug, Clone, Default)]
pub struct ClassStats {
    /// How many tensors.
    pub tensors: usize,
    /// Their bytes.
    pub bytes: u64,
    /// Dtypes seen.
    pub dtypes: BTreeSet<String>,
}

/// A summary of a checkpoint.
#[derive(Debug, Clone)]
pub struct Inspection {
    /// The kind of checkpoint.
    pub format: CheckpointFormat,
    /// Layer count.
    pub layers: usize,
    /// Experts per layer.
    pub experts: usize,
    /// Number of tensors.
    pub tensors: usize,
    /// Bytes of tensor data.
    pub bytes: u64,
    /// Parameters as mlx-lm counts them.
    pub params: usize,
    /// By class; `None` holds tensors mixq does not recognise.
    pub by_class: BTreeMap<Option<TensorClass>, ClassStats>,
    /// Quantized modules per setting label (`affine 6-bit gs64`), from the quantization map.
    pub quantization: BTreeMap<String, usize>,
    /// Number of shards.
    pub shards: usize,
}

impl Inspection {
    /// Bits per weight: 8 * bytes / parameters.
    pub fn bits_per_weight(&self) -> f64 {
        mixq_loader::bits_per_weight(self.bytes as usize, self.params)
    }
}

/// Summarises an open checkpoint; fails where config.json and the tensors disagree on how a
/// module is stored.
pub fn inspect(ckpt: &Checkpoint) -> Result<Inspection, LoaderError> {
    let c = ckpt.config();
    let mut by_class: BTreeMap<Option<TensorClass>, ClassStats> = BTreeMap::new();
    let mut tensors = 0;
    for shard in ckpt.shards() {
        for (name, info) in shard.tensors() {
            let s = by_class.entry(classify_name(name).map(|(c, _)| c)).or_default();
            s.tensors += 1;
            s.bytes += (info.end - info.begin) as u64;
            s.dtypes.insert(info.dtype.to_string());
            tensors += 1;
        }
    }
    let params = mlx_params(c);
    let mut quantization = BTreeMap::new();
    if ckpt.format() == CheckpointFormat::MlxQuantized {
        for p in &params {
            let format = param_format(ckpt, p)?;
            if format.is_quantized() {
                *quantization.entry(format.to_string()).or_default() += 1;
            }
        }
    }
    Ok(Inspection {
        format: ckpt.format(),
        layers: c.num_hidden_layers,
        experts: c.num_local_experts,
        tensors,
        bytes: ckpt.tensor_bytes(),
        params: params.iter().map(Param::counted_params).sum(),
        by_class,
        quantization,
        shards: ckpt.shards().len(),
    })
}
