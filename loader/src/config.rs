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

pub use crate::format::{QuantMode, QuantSpec};

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
    /// Longest context (`max_position_embeddings`, [`DEFAULT_MAX_CONTEXT`] when absent).
    pub max_position_embeddings: usize,
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

/// `max_position_embeddings` when config.json has none (gpt-oss's 131072).
pub const DEFAULT_MAX_CONTEXT: usize = 131072;

/// Upper bounds on config.json counts, each far above what any gpt-oss uses (gpt-oss-120b: 36
/// layers, width 2880, 128 experts, 4 per token, 64 query and 8 key/value heads of 64, a
/// 201088-token vocabulary, a window of 128, a 131072-token context) yet small enough that no
/// tensor size overflows and no layer loop or table allocates absurdly. Every count must also be
/// positive; `num_experts_per_tok` may not exceed `num_local_experts`, `sliding_window` not
/// `max_position_embeddings`.
pub const COUNT_LIMITS: &[(&str, u64)] = &[
    ("num_hidden_layers", 1024),
    ("hidden_size", 65536),
    ("intermediate_size", 65536),
    ("num_local_experts", 4096),
    ("num_experts_per_tok", 4096),
    ("num_attention_heads", 1024),
    ("num_key_value_heads", 1024),
    ("head_dim", 1024),
    ("vocab_size", 1 << 22),
    ("sliding_window", 1 << 24),
    ("max_position_embeddings", 1 << 24),
    ("rope_scaling.original_max_position_embeddings", 1 << 24),
];

/// The bound [`COUNT_LIMITS`] sets for a field (`u64::MAX` for one it does not list).
fn count_limit(key: &str) -> u64 {
    COUNT_LIMITS.iter().find(|(k, _)| *k == key).map_or(u64::MAX, |&(_, n)| n)
}

/// What a `quantization` entry may say, for error messages.
use crate::format::{QuantFormat, SUPPORTED_QUANTIZATION};


struct Fields<'a> {
    path: &'a Path,
    obj: &'a Map<String, Value>,
}

impl Fields<'_> {
    fn err(&self, message: String) -> LoaderError {
        LoaderError::Config { path: self.path.to_path_buf(), message }
    }

    /// A required count: a positive integer within [`COUNT_LIMITS`].
    fn usize(&self, key: &str) -> Result<usize> {
        self.usize_or(key, None)
    }

    /// A count that takes `default` when absent; `name` is how errors call it.
    fn usize_or(&self, key: &str, default: Option<usize>) -> Result<usize> {
        self.count(key, key, default)
    }

    fn count(&self, key: &str, name: &str, default: Option<usize>) -> Result<usize> {
        let limit = count_limit(name);
        match self.obj.get(key) {
            None => default.ok_or_else(|| self.err(format!("field `{name}` is missing (expected a positive integer)"))),
            Some(v) => match v.as_u64() {
                Some(n) if n > limit => Err(self.err(format!(
                    "field `{name}` is {n}, more than any gpt-oss could use (expected a positive integer of at most {limit})"
                ))),
                Some(n) if n > 0 => usize::try_from(n).map_err(|_| self.err(format!("field `{name}` ({n}) does not fit this machine's usize"))),
                _ => Err(self.err(format!("field `{name}` must be a positive integer, found {v}"))),
            },
        }
    }

    /// A number that must be finite and positive (and above `above` when given).
    fn positive(&self, key: &str, name: &str, default: Option<f64>, above: f64) -> Result<f64> {
        let x = self.f64_or(key, default).map_err(|_| match self.obj.get(key) {
            None => self.err(format!("field `{name}` is missing (expected a number)")),
            Some(v) => self.err(format!("field `{name}` must be a number, found {v}")),
        })?;
        if !x.is_finite() || x <= above {
            let what = if above == 0.0 { "a finite positive number".to_string() } else { format!("a finite number above {above}") };
            return Err(self.err(format!("field `{name}` must be {what}, found {x}")));
        }
        Ok(x)
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

/// `layer_types`, one per layer (alternating sliding/full when absent, as mlx-lm does).
fn layer_types(f: &Fields<'_>, num_hidden_layers: usize) -> Result<Vec<LayerType>> {
    Ok(match f.obj.get("layer_types") {
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
    })
}

/// `rope_scaling` (YaRN), if any.
fn rope_scaling(f: &Fields<'_>) -> Result<Option<RopeScaling>> {
    Ok(match f.obj.get("rope_scaling") {
        None | Some(Value::Null) => None,
        Some(Value::Object(rs)) => {
            let g = Fields { path: f.path, obj: rs };
            let rope_type = rs
                .get("rope_type")
                .or_else(|| rs.get("type"))
                .and_then(Value::as_str)
                .unwrap_or("yarn")
                .to_string();
            Some(RopeScaling {
                rope_type,
                factor: g.positive("factor", "rope_scaling.factor", None, 0.0)?,
                beta_fast: g.positive("beta_fast", "rope_scaling.beta_fast", Some(32.0), 0.0)?,
                beta_slow: g.positive("beta_slow", "rope_scaling.beta_slow", Some(1.0), 0.0)?,
                original_max_position_embeddings: g.count(
                    "original_max_position_embeddings",
                    "rope_scaling.original_max_position_embeddings",
                    Some(4096),
                )? as u64,
                truncate: g.bool_or("truncate", true).map_err(|_| {
                    let found = rs.get("truncate").map(Value::to_string).unwrap_or_default();
                    f.err(format!("field `rope_scaling.truncate` must be true or false, found {found}"))
                })?,
            })
        }
        Some(v) => return Err(f.err(format!("field `rope_scaling` must be an object, found {v}"))),
    })
}

/// The upstream `quant_method` and the MLX quantization map, each entry checked.
fn quantization(f: &Fields<'_>) -> Result<(Option<String>, Option<QuantizationMap>)> {
    let quant_method = f.obj
        .get("quantization_config")
        .and_then(|q| q.get("quant_method"))
        .and_then(Value::as_str)
        .map(str::to_string);
    let quantization = match f.obj.get("quantization") {
        None | Some(Value::Null) => None,
        Some(v) => Some(parse_quantization_map(v).map_err(|m| f.err(format!("field `quantization`: {m}")))?),
    };
    // An MLX checkpoint repeats its map as `quantization_config` (an upstream one has a
    // `quant_method` there instead): it must hold only supported settings too.
    if let Some(qc @ Value::Object(q)) = f.obj.get("quantization_config") {
        if !q.contains_key("quant_method") {
            parse_quantization_map(qc).map_err(|m| f.err(format!("field `quantization_config`: {m}")))?;
        }
    }
    Ok((quant_method, quantization))
}

impl GptOssConfig {
    /// Longest context the model supports (`max_position_embeddings`, validated when parsed).
    pub fn max_context(&self) -> usize {
        self.max_position_embeddings
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
        let layer_types = layer_types(&f, num_hidden_layers)?;
        let rope_scaling = rope_scaling(&f)?;
        let (quant_method, quantization) = quantization(&f)?;
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
        let hidden_size = f.usize("hidden_size")?;
        let intermediate_size = f.usize("intermediate_size")?;
        let head_dim = f.usize("head_dim")?;
        if head_dim % 2 != 0 {
            return Err(f.err(format!("field `head_dim` ({head_dim}) must be even (RoPE rotates pairs)")));
        }
        let vocab_size = f.usize("vocab_size")?;
        let max_position_embeddings = f.usize_or("max_position_embeddings", Some(DEFAULT_MAX_CONTEXT))?;
        let sliding_window = f.usize("sliding_window")?;
        if sliding_window > max_position_embeddings {
            return Err(f.err(format!(
                "`sliding_window` ({sliding_window}) exceeds `max_position_embeddings` ({max_position_embeddings})"
            )));
        }
        let largest = largest_tensor_bytes(hidden_size, intermediate_size, num_local_experts, num_attention_heads, head_dim, vocab_size)
            .ok_or_else(|| f.err("the tensor sizes these dimensions imply overflow 64 bits".into()))?;
        usize::try_from(largest)
            .map_err(|_| f.err(format!("the largest tensor these dimensions imply ({largest} bytes) does not fit this machine's usize")))?;
        Ok(GptOssConfig {
            path: path.to_path_buf(),
            num_hidden_layers,
            hidden_size,
            intermediate_size,
            num_local_experts,
            num_experts_per_tok,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            vocab_size,
            sliding_window,
            max_position_embeddings,
            layer_types,
            rope_theta: f.positive("rope_theta", "rope_theta", Some(150000.0), 1.0)?,
            rope_scaling,
            swiglu_limit: f.positive("swiglu_limit", "swiglu_limit", Some(7.0), 0.0)?,
            rms_norm_eps: f.positive("rms_norm_eps", "rms_norm_eps", Some(1e-5), 0.0)?,
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

/// Bytes of the largest tensor any supported layout of these dimensions stores (F32 at 4 bytes a
/// value, the widest dtype read), with checked arithmetic: `None` on overflow.
fn largest_tensor_bytes(hidden: usize, intermediate: usize, experts: usize, heads: usize, head_dim: usize, vocab: usize) -> Option<u64> {
    let [h, i, e, q, d, v] = [hidden, intermediate, experts, heads, head_dim, vocab].map(|n| n as u64);
    let attention = q.checked_mul(d)?.checked_mul(h)?;
    let embed = v.checked_mul(h)?;
    // transformers' dense experts: `gate_up_proj` [experts, hidden, 2 * intermediate].
    let experts = e.checked_mul(h)?.checked_mul(i.checked_mul(2)?)?;
    attention.max(embed).max(experts).checked_mul(4)
}

fn parse_spec(v: &Value) -> std::result::Result<QuantSpec, String> {
    let obj = v.as_object().ok_or_else(|| format!("expected an object, found {v}"))?;
    let bits = obj.get("bits").and_then(Value::as_u64).ok_or("missing integer `bits`")?;
    let group_size = obj.get("group_size").and_then(Value::as_u64).ok_or("missing integer `group_size`")?;
    let mode = match obj.get("mode").map(|m| m.as_str().ok_or_else(|| format!("`mode` must be a string, found {m}"))).transpose()? {
        None | Some("affine") => QuantMode::Affine,
        Some("mxfp4") => QuantMode::Mxfp4,
        Some(other) => return Err(format!("unsupported mode \"{other}\" ({SUPPORTED_QUANTIZATION})")),
    };
    let unsupported = || format!("{} with bits {bits} and group_size {group_size} is not supported ({SUPPORTED_QUANTIZATION})", mode.as_str());
    let (Ok(b), Ok(g)) = (u32::try_from(bits), u32::try_from(group_size)) else { return Err(unsupported()) };
    let spec = QuantSpec { bits: b, group_size: g, mode };
    QuantFormat::from_spec(spec).map_err(|_| unsupported())?;
    Ok(spec)
}

/// Parses an MLX `quantization` object: a default plus per-module entries.
pub fn parse_quantization_map(v: &Value) -> std::result::Result<QuantizationMap, String> {
    let obj = v.as_object().ok_or_else(|| format!("expected an object, found {v}"))?;
    let default = if obj.contains_key("bits") || obj.contains_key("group_size") {
        Some(parse_spec(v).map_err(|m| format!("top-level default: {m}"))?)
    } else {
        None
    };
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
    use crate::format::{AFFINE_BITS, AFFINE_GROUP_SIZES};

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

    fn parse_err(v: &serde_json::Value) -> String {
        match GptOssConfig::from_json_str(&v.to_string(), Path::new("c.json")) {
            Ok(_) => panic!("accepted {v}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn counts_are_positive_and_bounded() {
        for &(key, limit) in COUNT_LIMITS {
            let set = |v: &mut serde_json::Value, n: serde_json::Value| match key.strip_prefix("rope_scaling.") {
                Some(k) => v["rope_scaling"] = serde_json::json!({"factor": 32.0, k: n}),
                None => v[key] = n,
            };
            let mut v = minimal();
            set(&mut v, serde_json::json!(limit + 1));
            if key == "num_experts_per_tok" {
                v["num_local_experts"] = serde_json::json!(limit);
            }
            let e = parse_err(&v);
            assert!(e.starts_with("c.json: ") && e.contains(&format!("field `{key}` is {}", limit + 1)) && e.contains(&format!("at most {limit}")), "{e}");
            let mut v = minimal();
            set(&mut v, serde_json::json!(0));
            let e = parse_err(&v);
            assert!(e.contains(&format!("field `{key}` must be a positive integer, found 0")), "{e}");
        }
    }

    #[test]
    fn huge_layer_count_without_layer_types_is_refused_before_allocating() {
        let mut v = minimal();
        v["num_hidden_layers"] = serde_json::json!(1u64 << 40);
        assert!(parse_err(&v).contains("field `num_hidden_layers` is 1099511627776, more than any gpt-oss could use"));
    }

    #[test]
    fn related_counts_are_checked() {
        let mut v = minimal();
        v["max_position_embeddings"] = serde_json::json!(4);
        assert!(parse_err(&v).contains("`sliding_window` (8) exceeds `max_position_embeddings` (4)"));
        let mut v = minimal();
        v["rope_scaling"] = serde_json::json!({"factor": 32.0, "original_max_position_embeddings": 8192});
        v["max_position_embeddings"] = serde_json::json!(4096);
        // A context shortened below YaRN's original length is a valid model (tests/runtime.rs runs one).
        GptOssConfig::from_json_str(&v.to_string(), Path::new("c.json")).expect("a shortened context parses");
        let mut v = minimal();
        v["head_dim"] = serde_json::json!(33);
        assert!(parse_err(&v).contains("`head_dim` (33) must be even"));
        let mut v = minimal();
        v["max_position_embeddings"] = serde_json::json!("long");
        assert!(parse_err(&v).contains("field `max_position_embeddings` must be a positive integer, found \"long\""));
        let mut v = minimal();
        v["max_position_embeddings"] = serde_json::json!(4096);
        let c = GptOssConfig::from_json_str(&v.to_string(), Path::new("c.json")).unwrap();
        assert_eq!(c.max_context(), 4096);
        let c = GptOssConfig::from_json_str(&minimal().to_string(), Path::new("c.json")).unwrap();
        assert_eq!(c.max_context(), DEFAULT_MAX_CONTEXT);
    }

    #[test]
    fn the_largest_tensor_is_computed_with_checked_arithmetic() {
        // gpt-oss-120b: the dense expert tensor [128, 2880, 2 * 2880] in F32 is the largest.
        assert_eq!(largest_tensor_bytes(2880, 2880, 128, 64, 64, 201088), Some(128 * 2880 * 5760 * 4));
        assert_eq!(largest_tensor_bytes(64, 64, 1, 2, 32, 201088), Some(201088 * 64 * 4));
        assert_eq!(largest_tensor_bytes(usize::MAX, 2, 2, 2, 2, 2), None);
    }

    #[test]
    fn floats_are_finite_and_positive() {
        for (key, value, want) in [
            ("rms_norm_eps", serde_json::json!(0.0), "field `rms_norm_eps` must be a finite positive number, found 0"),
            ("rms_norm_eps", serde_json::json!(-1e-5), "field `rms_norm_eps` must be a finite positive number"),
            ("rms_norm_eps", serde_json::json!("small"), "field `rms_norm_eps` must be a number, found \"small\""),
            ("swiglu_limit", serde_json::json!(-7.0), "field `swiglu_limit` must be a finite positive number"),
            ("rope_theta", serde_json::json!(1.0), "field `rope_theta` must be a finite number above 1"),
            ("rope_scaling", serde_json::json!({"factor": 0.0}), "field `rope_scaling.factor` must be a finite positive number"),
            ("rope_scaling", serde_json::json!({"factor": "big"}), "field `rope_scaling.factor` must be a number"),
            ("rope_scaling", serde_json::json!({}), "field `rope_scaling.factor` is missing"),
            ("rope_scaling", serde_json::json!({"factor": 32.0, "beta_fast": -32.0}), "field `rope_scaling.beta_fast` must be a finite positive"),
            ("rope_scaling", serde_json::json!({"factor": 32.0, "beta_slow": 0}), "field `rope_scaling.beta_slow` must be a finite positive"),
        ] {
            let mut v = minimal();
            v[key] = value;
            let e = parse_err(&v);
            assert!(e.contains(want), "{key}: {e}");
        }
    }

    #[test]
    fn only_supported_quantization_settings_parse() {
        let bad = |module: serde_json::Value| {
            let mut v = minimal();
            v["quantization"] = serde_json::json!({"group_size": 64, "bits": 4, "mode": "affine", "lm_head": module});
            parse_err(&v)
        };
        let e = bad(serde_json::json!({"group_size": 0, "bits": 4, "mode": "affine"}));
        assert!(
            e.contains("field `quantization`: `lm_head`: affine with bits 4 and group_size 0 is not supported (supported: mode affine with bits 2, 3, 4, 5, 6 or 8"),
            "{e}"
        );
        assert!(bad(serde_json::json!({"group_size": 64, "bits": 7})).contains("`lm_head`: affine with bits 7 and group_size 64 is not supported"));
        assert!(bad(serde_json::json!({"group_size": 16, "bits": 4})).contains("group_size 16 is not supported"));
        assert!(bad(serde_json::json!({"group_size": 32, "bits": 8, "mode": "mxfp4"})).contains("`lm_head`: mxfp4 with bits 8 and group_size 32 is not supported"));
        assert!(bad(serde_json::json!({"group_size": 64, "bits": 4, "mode": "mxfp4"})).contains("mxfp4 with bits 4 and group_size 64"));
        assert!(bad(serde_json::json!({"group_size": 32, "bits": 4, "mode": "nf4"})).contains("unsupported mode \"nf4\" (supported:"));
        assert!(bad(serde_json::json!({"group_size": 32, "bits": 4, "mode": 4})).contains("`lm_head`: `mode` must be a string"));
        let mut v = minimal();
        v["quantization"] = serde_json::json!({"group_size": 0, "bits": 4});
        assert!(parse_err(&v).contains("field `quantization`: top-level default: affine with bits 4 and group_size 0"));
        let mut v = minimal();
        v["quantization_config"] = serde_json::json!({"group_size": 64, "bits": 4, "lm_head": {"group_size": 64, "bits": 9}});
        assert!(parse_err(&v).contains("field `quantization_config`: `lm_head`: affine with bits 9"));
        // Every supported setting parses.
        for bits in AFFINE_BITS {
            for gs in AFFINE_GROUP_SIZES {
                let m = parse_quantization_map(&serde_json::json!({"lm_head": {"group_size": gs, "bits": bits, "mode": "affine"}})).unwrap();
                assert_eq!(m.module("lm_head").unwrap().group_size, gs);
            }
        }
        let m = parse_quantization_map(&serde_json::json!({"e": {"group_size": 32, "bits": 4, "mode": "mxfp4"}})).unwrap();
        assert_eq!(m.module("e").unwrap().mode, QuantMode::Mxfp4);
    }
}
