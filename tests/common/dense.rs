//! The bundled upstream model in transformers' dense layout (issue 19), as `save_pretrained` writes
//! a dequantized gpt-oss: its MXFP4 experts decoded here, independently of the loader, into
//! `gate_up_proj [E, H, 2I]` (gate/up interleaved on the last axis) and `down_proj [E, I, H]`,
//! every tensor in one float type.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use safetensors::{tensor::TensorView, Dtype as StDtype};
use serde_json::Value;

use super::RawShard;

/// The bundled upstream model.
pub const MODEL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/models/tiny-gpt-oss-shakespeare");

/// A tensor as the fixture writes it: dtype, shape, little-endian bytes.
pub type Tensor = (StDtype, Vec<usize>, Vec<u8>);

/// The float type of the dense copy.
#[derive(Clone, Copy, Debug)]
pub enum Float {
    /// bfloat16: every upstream value exactly.
    Bf16,
    /// float16: values rounded to nearest (outside its range or precision, not exact).
    F16,
    /// float32: every upstream value exactly.
    F32,
}

impl Float {
    /// The value stored as this type (rounded to nearest).
    pub fn round(self, v: f32) -> f32 {
        match self {
            Float::Bf16 => half::bf16::from_f32(v).to_f32(),
            Float::F16 => half::f16::from_f32(v).to_f32(),
            Float::F32 => v,
        }
    }

    fn encode(self, v: f32) -> Vec<u8> {
        match self {
            Float::Bf16 => half::bf16::from_f32(v).to_le_bytes().to_vec(),
            Float::F16 => half::f16::from_f32(v).to_le_bytes().to_vec(),
            Float::F32 => v.to_le_bytes().to_vec(),
        }
    }

    fn dtype(self) -> StDtype {
        match self {
            Float::Bf16 => StDtype::BF16,
            Float::F16 => StDtype::F16,
            Float::F32 => StDtype::F32,
        }
    }

    /// The type as safetensors and mixq name it.
    pub fn name(self) -> &'static str {
        match self {
            Float::Bf16 => "BF16",
            Float::F16 => "F16",
            Float::F32 => "F32",
        }
    }

    /// config.json's `torch_dtype` for this type.
    fn torch_dtype(self) -> &'static str {
        match self {
            Float::Bf16 => "bfloat16",
            Float::F16 => "float16",
            Float::F32 => "float32",
        }
    }
}

/// FP4 E2M1 values by code, decoded here independently of the loader.
pub const E2M1: [f32; 16] = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0];

fn shape_of(header: &serde_json::Map<String, Value>, name: &str) -> Vec<usize> {
    header[name]["shape"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect()
}

/// Decodes `[E, R, C/32, 16]` blocks with `[E, R, C/32]` scales into transformers' transposed
/// dense values `[E, C, R]` (element `[e, c, r]` is upstream row `r`, column `c` of expert `e`).
fn decode_experts(blocks: &[u8], scales: &[u8], shape: &[usize]) -> (Vec<usize>, Vec<f32>) {
    let (e, r, c) = (shape[0], shape[1], shape[2] * 32);
    let mut vals = vec![0f32; e * c * r];
    for x in 0..e {
        for row in 0..r {
            for col in 0..c {
                let byte = blocks[((x * r + row) * c + col) / 2];
                let code = if col % 2 == 0 { byte & 0x0f } else { byte >> 4 };
                let scale = 2f32.powi(i32::from(scales[(x * r + row) * (c / 32) + col / 32]) - 127);
                vals[(x * c + col) * r + row] = E2M1[usize::from(code)] * scale;
            }
        }
    }
    (vec![e, c, r], vals)
}

/// One shard's tensors as f32: name → (shape, values).
pub type DenseShard = BTreeMap<String, (Vec<usize>, Vec<f32>)>;

/// Every value of the bundled model as f32 (experts decoded and transposed), by tensor name in
/// transformers' dense layout, grouped by source shard.
pub fn dense_values() -> Vec<DenseShard> {
    let mut shards = Vec::new();
    for file in ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"] {
        let raw = RawShard::read(&Path::new(MODEL).join(file));
        let mut out = BTreeMap::new();
        for name in raw.header.keys().filter(|k| *k != "__metadata__") {
            let bytes = &raw.data[raw.range(name)];
            if let Some(stem) = name.strip_suffix("_blocks") {
                let scales = &raw.data[raw.range(&format!("{stem}_scales"))];
                out.insert(stem.to_string(), decode_experts(bytes, scales, &shape_of(&raw.header, name)));
            } else if !name.ends_with("_scales") {
                assert_eq!(raw.header[name]["dtype"], "BF16", "{name}");
                let vals = bytes.chunks_exact(2).map(|b| f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16));
                out.insert(name.clone(), (shape_of(&raw.header, name), vals.collect()));
            }
        }
        shards.push(out);
    }
    shards
}

/// Writes the dense copy: the side files (config.json without `quantization_config` and with the
/// type's `torch_dtype`, as `save_pretrained` writes it after dequantizing), and the tensors in
/// one file or two shards; `edit` may change the first file's tensors before they are written.
pub fn write_dense(dir: &Path, float: Float, sharded: bool, edit: impl FnOnce(&mut BTreeMap<String, Tensor>)) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    for f in ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"] {
        std::fs::copy(Path::new(MODEL).join(f), dir.join(f)).unwrap();
    }
    let mut config: Value = serde_json::from_str(&std::fs::read_to_string(Path::new(MODEL).join("config.json")).unwrap()).unwrap();
    let obj = config.as_object_mut().unwrap();
    obj.remove("quantization_config");
    obj.insert("torch_dtype".into(), Value::from(float.torch_dtype()));
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(&config).unwrap()).unwrap();
    let mut shards: Vec<BTreeMap<String, Tensor>> = dense_values()
        .into_iter()
        .map(|s| s.into_iter().map(|(n, (shape, v))| (n, (float.dtype(), shape, v.iter().flat_map(|&x| float.encode(x)).collect()))).collect())
        .collect();
    if !sharded {
        let all = shards.drain(..).flatten().collect();
        shards.push(all);
    }
    edit(shards.first_mut().unwrap());
    let mut weight_map = serde_json::Map::new();
    for (i, tensors) in shards.iter().enumerate() {
        let file = if sharded { format!("model-{:05}-of-{:05}.safetensors", i + 1, shards.len()) } else { "model.safetensors".into() };
        let views: Vec<(String, TensorView<'_>)> =
            tensors.iter().map(|(n, (d, s, b))| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap())).collect();
        safetensors::serialize_to_file(views, None, &dir.join(&file)).unwrap();
        weight_map.extend(tensors.keys().map(|n| (n.clone(), Value::String(file.clone()))));
    }
    if sharded {
        let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
        std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    }
    dir.to_path_buf()
}
