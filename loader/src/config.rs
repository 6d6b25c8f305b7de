//! The typed gpt-oss config.json.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::error::{LoaderError, Result};

/// Which attention a layer uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LayerType {
    /// Attention over a window of the last `sliding_window` tokens.
    Sliding,
    /// Attention over the whole context.
    Full,
}

impl LayerType {
    /// The name used in config.json.
    pub fn as_str(self) -> &'static str {
        match self {
            LayerType::Sliding => "sliding_attention",
            LayerType::Full => "full_attention",
        }
    }

    /// Parses a config.json layer type name.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "sliding_attention" => Some(LayerType::Sliding),
            "full_attention" => Some(LayerType::Full),
            _ => None,
        }
    }
}

/// YaRN RoPE scaling parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct RopeScaling {
    /// The `rope_type` (gpt-oss: `yarn`).
    pub rope_type: String,
    /// Context extension factor.
    pub factor: f64,
    /// YaRN beta_fast.
    pub beta_fast: f64,
    /// YaRN beta_slow.
    pub beta_slow: f64,
    /// The pre-extension context length.
    pub original_max_position_embeddings: u64,
    /// Whether the correction range is floored/ceiled to integers.
    pub truncate: bool,
}

/// One MLX per-module quantization setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct QuantSpec {
    /// Bits per code.
    pub bits: u32,
    /// Elements sharing one scale.
    pub group_size: u32,
    /// `affine` or `mxfp4`.
    pub mode: QuantMode,
}

/// MLX quantization modes mixq reads and writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum QuantMode {
    /// `scale * q + bias` with bf16 scales and biases.
    Affine,
    /// FP4 E2M1 codes with E8M0 scales per 32 elements.
    Mxfp4,
}

impl QuantMode {
    /// The name used in config.json.
    pub fn as_str(self) -> &'static str {
        match self {
            QuantMode::Affine => "affine",
            QuantMode::Mxfp4 => "mxfp4",
        }
    }
}

/// The quantization map of an MLX checkpoint (config.json `quantization`).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct QuantizationMap {
    /// The top-level default.
    pub default: Option<QuantSpec>,
    /// Explicit per-module entries, by MLX module path (`false` entries are kept out).
    pub modules: std::collections::BTreeMap<String, QuantSpec>,
}

impl QuantizationMap {
    /// The setting of a module, if it is quantized by an explicit entry.
    pub fn module(&self, path: &str) -> Option<QuantSpec> {
        self.modules.get(path).copied()
    }
}

/// The fields of a gpt-oss config.json that mixq uses.
#[derive(Debug, Clone)]
pub struct GptOssConfig {
    /// Where it was read from.
    pub path: PathBuf,
    /// The whole JSON object, for writing it back with changes.
    pub raw: Map<String, Value>,
    /// Number of transformer layers.
    pub num_hidden_layers: usize,
    /// Model width.
    pub hidden_size: usize,
    /// Expert hidden width.
    pub intermediate_size: usize,
    /// Experts per layer.
    pub num_local_experts: usize,
    /// Experts routed per token.
    pub num_experts_per_tok: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads.
    pub num_key_value_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Window of sliding-attention layers.
    pub sliding_window: usize,
    /// Attention type per layer.
    pub layer_types: Vec<LayerType>,
    /// RoPE base.
    pub rope_theta: f64,
    /// YaRN scaling, if any.
    pub rope_scaling: Option<RopeScaling>,
    /// SwiGLU clamp limit.
    pub swiglu_limit: f64,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// Whether lm_head shares the embedding (gpt-oss: false).
    pub tie_word_embeddings: bool,
    /// `quantization_config.quant_method` of an upstream checkpoint.
    pub quant_method: Option<String>,
    /// The MLX quantization map of a converted checkpoint.
    pub quantization: Option<QuantizationMap>,
}

struct Fields<'a> {
    path: &'a Path,
    obj: &'a Map<String, Value>,
}

impl Fields<'_> {
    fn err(&self, message: String) -> LoaderError {
        LoaderError::Config { path: self.path.to_path_buf(), message }
    }

    fn usize(&self, key: &str) -> Result<usize> {
        match self.obj.get(key) {
            None => Err(self.err(format!("field `{key}` is missing (expected a positive integer)"))),
            Some(v) => match v.as_u64() {
                Some(n) if n > 0 => Ok(n as usize),
                _ => Err(self.err(format!("field `{key}` must be a positive integer, found {v}"))),
            },
        }
    }

    fn f64_or(&self, key: &str, default: Option<f64>) -> Result<f64> {
        match self.obj.get(key) {
            None => default.ok_or_else(|| self.err(format!("field `{key}` is missing (expected a number)"))),
            Some(v) => v.as_f64().ok_or_else(|| self.err(format!("field `{key}` must be a number, found {v}"))),
        }
    }

    fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.obj.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(v) => v.as_bool().ok_or_else(|| self.err(format!("field `{key}` must be true or false, found {v}"))),
        }
    }
}

impl GptOssConfig {
    /// Longest context the model supports (`max_position_embeddings`, 131072 when absent).
    pub fn max_context(&self) -> usize {
        self.raw.get("max_position_embeddings").and_then(|v| v.as_u64()).unwrap_or(131072) as usize
    }

    /// Reads and validates a config.json file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| LoaderError::io(path, e))?;
        Self::from_json_str(&text, path)
    }

    /// Parses config.json text; `path` is used in error messages.
    pub fn from_json_str(text: &str, path: &Path) -> Result<Self> {
        let value: Value = serde_json::from_str(text).map_err(|e| LoaderError::Config {
            path: path.to_path_buf(),
            message: format!("not valid JSON: {e}"),
        })?;
        let Value::Object(obj) = value else {
            return Err(LoaderError::Config { path: path.to_path_buf(), message: "expected a JSON object".into() });
        };
        Self::from_map(obj, path)
    }

    fn from_map(obj: Map<String, Value>, path: &Path) -> Result<Self> {
        let f = Fields { path, obj: &obj };
        match obj.get("model_type").and_then(Value::as_str) {
            Some("gpt_oss") => {}
            Some(other) => return Err(f.err(format!("field `model_type` must be \"gpt_oss\", found \"{other}\""))),
            None => return Err(f.err("field `model_type` is missing (expected \"gpt_oss\")".into())),
        }
        let num_hidden_layers = f.usize("num_hidden_layers")?;
        let layer_types = match obj.get("layer_types") {
            None | Some(Value::Null) => (0..num_hidden_layers)
                .map(|i| if i % 2 == 0 { LayerType::Sliding } else { LayerType::Full })
                .collect(),
            Some(Value::Array(items)) => {
                let mut types = Vec::with_capacity(items.len());
                for (i, item) in items.iter().enumerate() {
                    let t = item.as_str().and_then(LayerType::parse).ok_or_else(|| {
                        f.err(format!(
                            "field `layer_types[{i}]` must be \"sliding_attention\" or \"full_attention\", found {item}"
                        ))
                    })?;
                    types.push(t);
                }
                if types.len() != num_hidden_layers {
                    return Err(f.err(format!(
                        "field `layer_types` has {} entries but `num_hidden_layers` is {num_hidden_layers}",
                        types.len()
                    )));
                }
                types
            }
            Some(v) => return Err(f.err(format!("field `layer_types` must be a list, found {v}"))),
        };
        let rope_scaling = match obj.get("rope_scaling") {
            None | Some(Value::Null) => None,
            Some(Value::Object(rs)) => {
                let g = Fields { path, obj: rs };
                let rope_type = rs
                    .get("rope_type")
                    .or_else(|| rs.get("type"))
                    .and_then(Value::as_str)
                    .unwrap_or("yarn")
                    .to_string();
                Some(RopeScaling {
                    rope_type,
                    factor: g.f64_or("factor", None).map_err(|_| f.err("field `rope_scaling.factor` must be a number".into()))?,
                    beta_fast: g.f64_or("beta_fast", Some(32.0))?,
                    beta_slow: g.f64_or("beta_slow", Some(1.0))?,
                    original_max_position_embeddings: g.f64_or("original_max_position_embeddings", Some(4096.0))? as u64,
                    truncate: g.bool_or("truncate", true)?,
                })
            }
            Some(v) => return Err(f.err(format!("field `rope_scaling` must be an object, found {v}"))),
        };
        let quant_method = obj
            .get("quantization_config")
            .and_then(|q| q.get("quant_method"))
            .and_then(Value::as_str)
            .map(str::to_string);
        let quantization = match obj.get("quantization") {
            None | Some(Value::Null) => None,
            Some(v) => Some(parse_quantization_map(v).map_err(|m| f.err(format!("field `quantization`: {m}")))?),
        };
        let num_attention_heads = f.usize("num_attention_heads")?;
        let num_key_value_heads = f.usize("num_key_value_heads")?;
        if num_attention_heads % num_key_value_heads != 0 {
            return Err(f.err(format!(
                "`num_attention_heads` ({num_attention_heads}) must be a multiple of `num_key_value_heads` ({num_key_value_heads})"
            )));
        }
        let num_local_experts = f.usize("num_local_experts")?;
        let num_experts_per_tok = f.usize("num_experts_per_tok")?;
        if num_experts_per_tok > num_local_experts {
            return Err(f.err(format!(
                "`num_experts_per_tok` ({num_experts_per_tok}) exceeds `num_local_experts` ({num_local_experts})"
            )));
        }
        Ok(GptOssConfig {
            path: path.to_path_buf(),
            num_hidden_layers,
            hidden_size: f.usize("hidden_size")?,
            intermediate_size: f.usize("intermediate_size")?,
            num_local_experts,
            num_experts_per_tok,
            num_attention_heads,
            num_key_value_heads,
            head_dim: f.usize("head_dim")?,
            vocab_size: f.usize("vocab_size")?,
            sliding_window: f.usize("sliding_window")?,
            layer_types,
            rope_theta: f.f64_or("rope_theta", Some(150000.0))?,
            rope_scaling,
            swiglu_limit: f.f64_or("swiglu_limit", Some(7.0))?,
            rms_norm_eps: f.f64_or("rms_norm_eps", Some(1e-5))?,
            tie_word_embeddings: f.bool_or("tie_word_embeddings", false)?,
            quant_method,
            quantization,
            raw: obj,
        })
    }

    /// Whether the experts are stored upstream-style as MXFP4 blocks and scales.
    pub fn is_upstream_mxfp4(&self) -> bool {
        self.quant_method.as_deref() == Some("mxfp4") && self.quantization.is_none()
    }
}

fn parse_spec(v: &Value) -> std::result::Result<QuantSpec, String> {
    let obj = v.as_object().ok_or_else(|| format!("expected an object, found {v}"))?;
    let bits = obj.get("bits").and_then(Value::as_u64).ok_or("missing integer `bits`")? as u32;
    let group_size = obj.get("group_size").and_then(Value::as_u64).ok_or("missing integer `group_size`")? as u32;
    let mode = match obj.get("mode").and_then(Value::as_str).unwrap_or("affine") {
        "affine" => QuantMode::Affine,
        "mxfp4" => QuantMode::Mxfp4,
        other => return Err(format!("unsupported mode \"{other}\" (mixq reads affine and mxfp4)")),
    };
    Ok(QuantSpec { bits, group_size, mode })
}

/// Parses an MLX `quantization` object: a default plus per-module entries.
pub fn parse_quantization_map(v: &Value) -> std::result::Result<QuantizationMap, String> {
    let obj = v.as_object().ok_or_else(|| format!("expected an object, found {v}"))?;
    let default = if obj.contains_key("bits") { Some(parse_spec(v)?) } else { None };
    let mut modules = std::collections::BTreeMap::new();
    for (key, value) in obj {
        if matches!(key.as_str(), "bits" | "group_size" | "mode") {
            continue;
        }
        match value {
            Value::Bool(false) => {}
            Value::Bool(true) => {
                let spec = default.ok_or_else(|| format!("`{key}: true` needs a top-level default"))?;
                modules.insert(key.clone(), spec);
            }
            other => {
                modules.insert(key.clone(), parse_spec(other).map_err(|m| format!("`{key}`: {m}"))?);
            }
        }
    }
    Ok(QuantizationMap { default, modules })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn minimal() -> serde_json::Value {
        serde_json::json!({
            "model_type": "gpt_oss", "num_hidden_layers": 2, "hidden_size": 64,
            "intermediate_size": 64, "num_local_experts": 4, "num_experts_per_tok": 2,
            "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32,
            "vocab_size": 100, "sliding_window": 8
        })
    }

    #[test]
    fn defaults_alternate_layer_types() {
        let c = GptOssConfig::from_json_str(&minimal().to_string(), Path::new("c.json")).unwrap();
        assert_eq!(c.layer_types, vec![LayerType::Sliding, LayerType::Full]);
        assert_eq!(c.swiglu_limit, 7.0);
    }

    #[test]
    fn missing_field_is_named() {
        let mut v = minimal();
        v.as_object_mut().unwrap().remove("hidden_size");
        let e = GptOssConfig::from_json_str(&v.to_string(), Path::new("c.json")).unwrap_err();
        assert!(e.to_string().contains("`hidden_size` is missing"), "{e}");
    }

    #[test]
    fn wrong_kind_is_named() {
        let mut v = minimal();
        v["head_dim"] = serde_json::json!("wide");
        let e = GptOssConfig::from_json_str(&v.to_string(), Path::new("c.json")).unwrap_err();
        assert!(e.to_string().contains("`head_dim` must be a positive integer"), "{e}");
        let mut v = minimal();
        v["layer_types"] = serde_json::json!(["sliding_attention", "global"]);
        let e = GptOssConfig::from_json_str(&v.to_string(), Path::new("c.json")).unwrap_err();
        assert!(e.to_string().contains("layer_types[1]"), "{e}");
    }

    #[test]
    fn quantization_map_parses_entries() {
        let v = serde_json::json!({"group_size": 64, "bits": 4, "mode": "affine",
            "lm_head": {"group_size": 32, "bits": 6, "mode": "affine"},
            "model.layers.0.mlp.experts.gate_proj": {"group_size": 32, "bits": 4, "mode": "mxfp4"},
            "model.layers.0.mlp.router": false});
        let m = parse_quantization_map(&v).unwrap();
        assert_eq!(m.default.unwrap().bits, 4);
        assert_eq!(m.module("lm_head").unwrap().bits, 6);
        assert_eq!(m.module("model.layers.0.mlp.experts.gate_proj").unwrap().mode, QuantMode::Mxfp4);
        assert!(m.module("model.layers.0.mlp.router").is_none());
    }
}
