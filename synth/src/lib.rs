//! mixq-synth: writes deterministic gpt-oss checkpoints of any shape, for tests and benchmarks:
//! config.json, a byte-level tokenizer, generation config, shards and index, with heavy-tailed
//! weights; upstream layout (BF16, MXFP4-encoded experts) or transformers' dense layout of a
//! fine-tune (BF16, F16 or F32 throughout).

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use mixq_loader::decode::FP4_VALUES;
use mixq_loader::schema::{source_tensors, upstream_tensors};
use mixq_loader::{FloatDtype, SourceLayout, TensorSpec};
use mixq_loader::GptOssConfig;
use serde_json::{json, Value};

/// A failure to write the generated checkpoint.
#[derive(Debug, thiserror::Error)]
pub enum SynthError {
    /// An I/O failure on a named path.
    #[error("{path}: {error}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        error: std::io::Error,
    },
    /// The shape cannot form a valid gpt-oss config.
    #[error("invalid shape: {0}")]
    Shape(String),
}

/// The dimensions of a generated model.
#[derive(Debug, Clone, PartialEq)]
pub struct Shape {
    /// Transformer layers.
    pub layers: usize,
    /// Model width (multiple of 32).
    pub hidden: usize,
    /// Expert width (multiple of 32).
    pub intermediate: usize,
    /// Experts per layer.
    pub experts: usize,
    /// Experts per token.
    pub top_k: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Head width.
    pub head_dim: usize,
    /// Vocabulary size.
    pub vocab: usize,
    /// Sliding-attention window.
    pub sliding_window: usize,
    /// YaRN `truncate`.
    pub truncate: bool,
    /// Number of shard files.
    pub shards: usize,
    /// RNG seed.
    pub seed: u64,
}

impl Shape {
    /// A named preset: `tiny`, `small`, `wide`, or `medium` (about 1 GB, for benches).
    pub fn preset(name: &str) -> Option<Shape> {
        let base = Shape {
            layers: 2,
            hidden: 64,
            intermediate: 64,
            experts: 4,
            top_k: 2,
            heads: 2,
            kv_heads: 1,
            head_dim: 64,
            vocab: 300,
            sliding_window: 8,
            truncate: true,
            shards: 2,
            seed: 1,
        };
        Some(match name {
            "tiny" => base,
            "small" => Shape { layers: 4, hidden: 192, intermediate: 128, experts: 8, top_k: 4, heads: 4, kv_heads: 2, vocab: 512, sliding_window: 16, seed: 2, ..base },
            "wide" => Shape { layers: 6, hidden: 256, intermediate: 320, experts: 6, top_k: 2, heads: 8, kv_heads: 2, vocab: 1000, sliding_window: 16, shards: 3, seed: 3, ..base },
            "medium" => Shape { layers: 8, hidden: 1024, intermediate: 2048, experts: 32, top_k: 4, heads: 16, kv_heads: 4, vocab: 8192, sliding_window: 128, shards: 4, seed: 4, ..base },
            _ => return None,
        })
    }

    /// The shape of a real model's config.json (e.g. gpt-oss-20b's), in upstream-sized shards of
    /// at most 5 GB.
    pub fn from_config(config: &GptOssConfig, seed: u64) -> Shape {
        let bytes: usize = upstream_tensors(config).iter().map(TensorSpec::nbytes).sum();
        Shape {
            layers: config.num_hidden_layers,
            hidden: config.hidden_size,
            intermediate: config.intermediate_size,
            experts: config.num_local_experts,
            top_k: config.num_experts_per_tok,
            heads: config.num_attention_heads,
            kv_heads: config.num_key_value_heads,
            head_dim: config.head_dim,
            vocab: config.vocab_size,
            sliding_window: config.sliding_window,
            truncate: config.rope_scaling.as_ref().map(|r| r.truncate).unwrap_or(true),
            shards: bytes.div_ceil(5_000_000_000).max(1),
            seed,
        }
    }

    /// The config.json this shape implies.
    pub fn config_json(&self) -> Value {
        let layer_types: Vec<&str> =
            (0..self.layers).map(|i| if i % 2 == 0 { "sliding_attention" } else { "full_attention" }).collect();
        json!({
            "architectures": ["GptOssForCausalLM"],
            "attention_bias": true,
            "attention_dropout": 0.0,
            "eos_token_id": 0,
            "experts_per_token": self.top_k,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "hidden_size": self.hidden,
            "initial_context_length": 4096,
            "initializer_range": 0.02,
            "intermediate_size": self.intermediate,
            "layer_types": layer_types,
            "max_position_embeddings": 131072,
            "model_type": "gpt_oss",
            "num_attention_heads": self.heads,
            "num_experts_per_tok": self.top_k,
            "num_hidden_layers": self.layers,
            "num_key_value_heads": self.kv_heads,
            "num_local_experts": self.experts,
            "output_router_logits": false,
            "pad_token_id": 0,
            "quantization_config": {
                "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"],
                "quant_method": "mxfp4"
            },
            "rms_norm_eps": 1e-05,
            "rope_scaling": {
                "beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0,
                "original_max_position_embeddings": 4096, "rope_type": "yarn", "truncate": self.truncate
            },
            "rope_theta": 150000,
            "router_aux_loss_coef": 0.9,
            "sliding_window": self.sliding_window,
            "swiglu_limit": 7.0,
            "tie_word_embeddings": false,
            "transformers_version": "4.55.0.dev0",
            "use_cache": true,
            "vocab_size": self.vocab
        })
    }
}

/// SplitMix64: small, fast, deterministic.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn uniform(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 + 0.5) / (1u64 << 24) as f32
    }

    /// A heavy-tailed sample: Gaussian, with 1 in 64 samples scaled by up to 8.
    fn heavy(&mut self) -> f32 {
        let (u1, u2) = (self.uniform(), self.uniform());
        let g = (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos();
        if self.next_u64().is_multiple_of(64) {
            g * (1.0 + 7.0 * self.uniform())
        } else {
            g
        }
    }
}

fn name_seed(seed: u64, name: &str) -> u64 {
    name.bytes().fold(seed ^ 0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3))
}

/// Writes the bytes of one generated tensor, element by element (a dense expert tensor of a
/// large model is a gigabyte). Float tensors are written in `float`; dense expert weights are
/// E2M1 values at the upstream blocks' scales, so they hold what a dequantized checkpoint holds.
fn write_tensor(w: &mut impl Write, t: &TensorSpec, seed: u64, float: FloatDtype) -> std::io::Result<()> {
    let mut rng = Rng(name_seed(seed, &t.name));
    let n: usize = t.shape.iter().product();
    if t.name.ends_with("_blocks") {
        return (0..n).try_for_each(|_| w.write_all(&[rng.next_u64() as u8]));
    }
    if t.name.ends_with("_scales") {
        // 2^-9 .. 2^-7: expert weights of a few hundredths, as in gpt-oss.
        return (0..n).try_for_each(|_| w.write_all(&[118 + (rng.next_u64() % 3) as u8]));
    }
    let put = |w: &mut dyn Write, v: f32| match float {
        FloatDtype::BF16 => w.write_all(&half::bf16::from_f32(v).to_bits().to_le_bytes()),
        FloatDtype::F16 => w.write_all(&half::f16::from_f32(v).to_bits().to_le_bytes()),
        FloatDtype::F32 => w.write_all(&v.to_le_bytes()),
    };
    if t.name.ends_with("_proj") {
        // Dense experts (`mlp.experts.gate_up_proj`, `down_proj`).
        return (0..n).try_for_each(|_| {
            let r = rng.next_u64();
            put(w, FP4_VALUES[(r & 15) as usize] * 2f32.powi(-7 - ((r >> 4) % 3) as i32))
        });
    }
    let (center, spread) = if t.name.ends_with("layernorm.weight") || t.name == "model.norm.weight" {
        (1.0, 0.1)
    } else if t.name.ends_with(".sinks") {
        (0.0, 0.5)
    } else if t.name.ends_with("bias") {
        (0.0, 0.02)
    } else {
        (0.0, 1.0 / (*t.shape.last().unwrap_or(&1) as f32).sqrt())
    };
    (0..n).try_for_each(|_| put(w, center + spread * rng.heavy()))
}

/// GPT-2's byte-to-unicode map used by byte-level BPE vocabularies.
fn byte_level_alphabet() -> Vec<char> {
    let mut printable: Vec<u32> = (b'!' as u32..=b'~' as u32).chain(0xA1..=0xAC).chain(0xAE..=0xFF).collect();
    let mut chars = vec!['\0'; 256];
    let mut extra = 0;
    for b in 0..256u32 {
        if let Some(pos) = printable.iter().position(|&p| p == b) {
            printable.remove(pos);
            chars[b as usize] = char::from_u32(b).unwrap_or('?');
        } else {
            chars[b as usize] = char::from_u32(256 + extra).unwrap_or('?');
            extra += 1;
        }
    }
    chars
}

/// A byte-level BPE tokenizer.json: `<|endoftext|>` is id 0, bytes are ids 1..=256, no merges.
pub fn tokenizer_json() -> Value {
    let mut vocab = serde_json::Map::new();
    vocab.insert("<|endoftext|>".into(), json!(0));
    for (i, c) in byte_level_alphabet().into_iter().enumerate() {
        vocab.insert(c.to_string(), json!(i + 1));
    }
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [{"id": 0, "content": "<|endoftext|>", "single_word": false, "lstrip": false,
                          "rstrip": false, "normalized": false, "special": true}],
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": []}
    })
}

fn write_json(path: &Path, v: &Value) -> Result<(), SynthError> {
    let text = serde_json::to_string_pretty(v).expect("JSON values always serialize");
    std::fs::write(path, text + "\n").map_err(|source| SynthError::Io { path: path.to_path_buf(), error: source })
}

/// Writes a generated upstream-layout checkpoint into `dir` (created if needed).
pub fn write_checkpoint(dir: &Path, shape: &Shape) -> Result<(), SynthError> {
    write_checkpoint_as(dir, shape, SourceLayout::Mxfp4)
}

/// Writes a generated checkpoint of `layout` into `dir`: upstream (MXFP4 experts) or
/// transformers' dense layout of a fine-tune (every tensor in one float type, no
/// `quantization_config`).
pub fn write_checkpoint_as(dir: &Path, shape: &Shape, layout: SourceLayout) -> Result<(), SynthError> {
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |source| SynthError::Io { path: p, error: source }
    };
    if !shape.hidden.is_multiple_of(32) || !shape.intermediate.is_multiple_of(32) {
        return Err(SynthError::Shape("hidden and intermediate must be multiples of 32 (MXFP4 blocks)".into()));
    }
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let mut config_value = shape.config_json();
    if layout != SourceLayout::Mxfp4 {
        if let Some(c) = config_value.as_object_mut() {
            c.remove("quantization_config");
        }
    }
    let config = GptOssConfig::from_json_str(&config_value.to_string(), Path::new("config.json"))
        .map_err(|e| SynthError::Shape(e.to_string()))?;
    write_json(&dir.join("config.json"), &config_value)?;
    write_json(&dir.join("generation_config.json"), &json!({"eos_token_id": [0], "pad_token_id": 0, "do_sample": true}))?;
    write_json(&dir.join("tokenizer.json"), &tokenizer_json())?;
    write_json(
        &dir.join("tokenizer_config.json"),
        &json!({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": null, "eos_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>", "unk_token": null, "clean_up_tokenization_spaces": false,
                "model_max_length": 131072}),
    )?;
    write_json(&dir.join("special_tokens_map.json"), &json!({"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}))?;

    let tensors = source_tensors(&config, layout);
    let total: usize = tensors.iter().map(|t| t.nbytes()).sum();
    let per_shard = total.div_ceil(shape.shards.max(1));
    let mut groups: Vec<Vec<&TensorSpec>> = vec![Vec::new()];
    let mut filled = 0;
    for t in &tensors {
        let n = t.nbytes();
        if filled >= per_shard && groups.len() < shape.shards {
            groups.push(Vec::new());
            filled = 0;
        }
        groups.last_mut().expect("non-empty").push(t);
        filled += n;
    }
    let count = groups.len();
    let mut weight_map = serde_json::Map::new();
    for (i, group) in groups.iter().enumerate() {
        let name = if count == 1 { "model.safetensors".to_string() } else { format!("model-{:05}-of-{count:05}.safetensors", i + 1) };
        let entries: Vec<(&str, mixq_loader::Dtype, &[usize])> =
            group.iter().map(|t| (t.name.as_str(), t.dtype, t.shape.as_slice())).collect();
        let (header, _) = mixq_loader::shard::encode_header(&[("format", "pt")], &entries);
        for t in group {
            weight_map.insert(t.name.clone(), json!(name));
        }
        let path = dir.join(&name);
        let mut w = BufWriter::with_capacity(8 << 20, File::create(&path).map_err(io(&path))?);
        w.write_all(&header).map_err(io(&path))?;
        for t in group {
            write_tensor(&mut w, t, shape.seed, layout.float_dtype()).map_err(io(&path))?;
        }
        w.flush().map_err(io(&path))?;
    }
    let mut sorted: Vec<(String, Value)> = weight_map.into_iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    write_json(
        &dir.join(mixq_loader::INDEX_FILE),
        &json!({"metadata": {"total_size": total}, "weight_map": sorted.into_iter().collect::<serde_json::Map<_, _>>()}),
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_checkpoint_opens_and_validates() {
        let tmp = std::env::temp_dir().join(format!("mixq-synth-test-{}", std::process::id()));
        let shape = Shape::preset("tiny").unwrap();
        write_checkpoint(&tmp, &shape).unwrap();
        let ckpt = mixq_loader::Checkpoint::open(&tmp).unwrap();
        mixq_loader::layout::validate_upstream(&ckpt).unwrap();
        assert_eq!(ckpt.shards().len(), 2);
        // Deterministic: the same shape gives the same bytes.
        let a = std::fs::read(tmp.join("model-00001-of-00002.safetensors")).unwrap();
        write_checkpoint(&tmp, &shape).unwrap();
        assert_eq!(a, std::fs::read(tmp.join("model-00001-of-00002.safetensors")).unwrap());
        std::fs::remove_dir_all(&tmp).unwrap();
    }

    #[test]
    fn dense_checkpoint_validates_in_every_float_type() {
        for float in FloatDtype::ALL {
            let tmp = std::env::temp_dir().join(format!("mixq-synth-dense-{float}-{}", std::process::id()));
            write_checkpoint_as(&tmp, &Shape::preset("tiny").unwrap(), SourceLayout::Dense(float)).unwrap();
            let ckpt = mixq_loader::Checkpoint::open(&tmp).unwrap();
            assert_eq!(ckpt.format().source_layout(), Some(SourceLayout::Dense(float)));
            mixq_loader::layout::validate_source(&ckpt, SourceLayout::Dense(float)).unwrap();
            std::fs::remove_dir_all(&tmp).unwrap();
        }
    }

    #[test]
    fn alphabet_is_a_bijection() {
        let a = byte_level_alphabet();
        let set: std::collections::HashSet<char> = a.iter().copied().collect();
        assert_eq!(set.len(), 256);
        assert_eq!(a[b'A' as usize], 'A');
        assert_eq!(a[b' ' as usize], '\u{120}');
    }
}
