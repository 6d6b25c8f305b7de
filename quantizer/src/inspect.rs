//! `mixq inspect`: what a checkpoint holds, by tensor class.

use std::collections::{BTreeMap, BTreeSet};

use mixq_loader::{Checkpoint, CheckpointFormat};

use crate::modules::{classify_name, mlx_params, TensorClass};
use crate::plan::source_size;

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
        8.0 * self.bytes as f64 / self.params as f64
    }
}

/// Summarises an open checkpoint.
pub fn inspect(ckpt: &Checkpoint) -> Inspection {
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
    let params = match ckpt.format() {
        CheckpointFormat::UpstreamMxfp4 => source_size(c).1,
        _ => mlx_params(c).iter().filter(|p| p.class != TensorClass::Sinks).map(|p| p.numel()).sum(),
    };
    let mut quantization = BTreeMap::new();
    if let Some(map) = &c.quantization {
        for spec in map.modules.values() {
            let label = match spec.mode {
                mixq_loader::QuantMode::Affine => format!("affine {}-bit gs{}", spec.bits, spec.group_size),
                mixq_loader::QuantMode::Mxfp4 => "mxfp4".to_string(),
            };
            *quantization.entry(label).or_default() += 1;
        }
    }
    Inspection {
        format: ckpt.format(),
        layers: c.num_hidden_layers,
        experts: c.num_local_experts,
        tensors,
        bytes: ckpt.tensor_bytes(),
        params,
        by_class,
        quantization,
        shards: ckpt.shards().len(),
    }
}
