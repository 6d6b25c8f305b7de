//! The parameters of a gpt-oss model as MLX names them, each with its tensor class.

use mixq_loader::{GptOssConfig, LayerType};

/// What role a parameter plays; recipes select by it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TensorClass {
    /// Token embedding table.
    EmbedTokens,
    /// Output projection.
    LmHead,
    /// Attention query projection.
    QProj,
    /// Attention key projection.
    KProj,
    /// Attention value projection.
    VProj,
    /// Attention output projection.
    OProj,
    /// MoE router.
    Router,
    /// Expert gate projection.
    ExpertsGate,
    /// Expert up projection.
    ExpertsUp,
    /// Expert down projection.
    ExpertsDown,
    /// RMSNorm weights.
    Norm,
    /// Linear-layer biases.
    Bias,
    /// Attention sinks.
    Sinks,
}

impl TensorClass {
    /// Every class, in table order.
    pub const ALL: [TensorClass; 13] = [
        TensorClass::EmbedTokens,
        TensorClass::LmHead,
        TensorClass::QProj,
        TensorClass::KProj,
        TensorClass::VProj,
        TensorClass::OProj,
        TensorClass::Router,
        TensorClass::ExpertsGate,
        TensorClass::ExpertsUp,
        TensorClass::ExpertsDown,
        TensorClass::Norm,
        TensorClass::Bias,
        TensorClass::Sinks,
    ];

    /// The recipe spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            TensorClass::EmbedTokens => "embed_tokens",
            TensorClass::LmHead => "lm_head",
            TensorClass::QProj => "q_proj",
            TensorClass::KProj => "k_proj",
            TensorClass::VProj => "v_proj",
            TensorClass::OProj => "o_proj",
            TensorClass::Router => "router",
            TensorClass::ExpertsGate => "experts_gate",
            TensorClass::ExpertsUp => "experts_up",
            TensorClass::ExpertsDown => "experts_down",
            TensorClass::Norm => "norm",
            TensorClass::Bias => "bias",
            TensorClass::Sinks => "sinks",
        }
    }

    /// Parses a recipe class name; `experts` and `attention` are shorthands for several.
    pub fn parse_group(name: &str) -> Option<Vec<TensorClass>> {
        use TensorClass::*;
        Some(match name {
            "experts" => vec![ExpertsGate, ExpertsUp, ExpertsDown],
            "attention" => vec![QProj, KProj, VProj, OProj],
            "norms" => vec![Norm],
            "biases" => vec![Bias],
            _ => vec![*Self::ALL.iter().find(|c| c.as_str() == name)?],
        })
    }

    /// Whether MLX can quantize a parameter of this class (a Linear, Embedding or SwitchLinear weight).
    pub fn is_quantizable(self) -> bool {
        !matches!(self, TensorClass::Norm | TensorClass::Bias | TensorClass::Sinks)
    }

    /// Whether this is an expert projection (the only classes stored as MXFP4 upstream).
    pub fn is_expert(self) -> bool {
        matches!(self, TensorClass::ExpertsGate | TensorClass::ExpertsUp | TensorClass::ExpertsDown)
    }
}

/// One parameter of the MLX model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Param {
    /// Its class.
    pub class: TensorClass,
    /// The layer it belongs to, if any.
    pub layer: Option<usize>,
    /// The layer's attention type, if any.
    pub layer_type: Option<LayerType>,
    /// The MLX module path (`model.layers.3.self_attn.q_proj`); for a quantizable weight, the module
    /// that the quantization map names.
    pub module: String,
    /// The parameter name within the module (`weight`, `bias`, `sinks`).
    pub leaf: &'static str,
    /// Logical shape: `[..., out, in]` for weights.
    pub shape: Vec<usize>,
}

impl Param {
    /// The full tensor name of the unquantized parameter.
    pub fn name(&self) -> String {
        format!("{}.{}", self.module, self.leaf)
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Input features (last dimension).
    pub fn in_features(&self) -> usize {
        *self.shape.last().unwrap_or(&0)
    }

    /// Whether this is a weight MLX could quantize.
    pub fn is_quantizable(&self) -> bool {
        self.class.is_quantizable() && self.leaf == "weight"
    }
}

/// Every parameter of the MLX gpt-oss model for a config, in model order.
pub fn mlx_params(c: &GptOssConfig) -> Vec<Param> {
    use TensorClass::*;
    let (h, i, e, v) = (c.hidden_size, c.intermediate_size, c.num_local_experts, c.vocab_size);
    let q = c.num_attention_heads * c.head_dim;
    let kv = c.num_key_value_heads * c.head_dim;
    let p = |class, layer: Option<usize>, module: String, leaf, shape: &[usize]| Param {
        class,
        layer,
        layer_type: layer.map(|l| c.layer_types[l]),
        module,
        leaf,
        shape: shape.to_vec(),
    };
    let mut out = vec![p(EmbedTokens, None, "model.embed_tokens".into(), "weight", &[v, h])];
    for l in 0..c.num_hidden_layers {
        let m = |s: &str| format!("model.layers.{l}.{s}");
        let at = Some(l);
        out.extend([
            p(Norm, at, m("input_layernorm"), "weight", &[h]),
            p(Norm, at, m("post_attention_layernorm"), "weight", &[h]),
            p(QProj, at, m("self_attn.q_proj"), "weight", &[q, h]),
            p(Bias, at, m("self_attn.q_proj"), "bias", &[q]),
            p(KProj, at, m("self_attn.k_proj"), "weight", &[kv, h]),
            p(Bias, at, m("self_attn.k_proj"), "bias", &[kv]),
            p(VProj, at, m("self_attn.v_proj"), "weight", &[kv, h]),
            p(Bias, at, m("self_attn.v_proj"), "bias", &[kv]),
            p(OProj, at, m("self_attn.o_proj"), "weight", &[h, q]),
            p(Bias, at, m("self_attn.o_proj"), "bias", &[h]),
            p(Sinks, at, m("self_attn"), "sinks", &[c.num_attention_heads]),
            p(Router, at, m("mlp.router"), "weight", &[e, h]),
            p(Bias, at, m("mlp.router"), "bias", &[e]),
            p(ExpertsGate, at, m("mlp.experts.gate_proj"), "weight", &[e, i, h]),
            p(Bias, at, m("mlp.experts.gate_proj"), "bias", &[e, i]),
            p(ExpertsUp, at, m("mlp.experts.up_proj"), "weight", &[e, i, h]),
            p(Bias, at, m("mlp.experts.up_proj"), "bias", &[e, i]),
            p(ExpertsDown, at, m("mlp.experts.down_proj"), "weight", &[e, h, i]),
            p(Bias, at, m("mlp.experts.down_proj"), "bias", &[e, h]),
        ]);
    }
    out.push(p(Norm, None, "model.norm".into(), "weight", &[h]));
    out.push(p(LmHead, None, "lm_head".into(), "weight", &[v, h]));
    out
}

/// Classifies an MLX tensor name (`….q_proj.scales` included) back to its class and layer.
pub fn classify_name(name: &str) -> Option<(TensorClass, Option<usize>)> {
    use TensorClass::*;
    let layer = name
        .strip_prefix("model.layers.")
        .and_then(|rest| rest.split('.').next())
        .and_then(|n| n.parse().ok());
    let leaf = name.rsplit('.').next()?;
    let class = if name.ends_with("layernorm.weight") || name == "model.norm.weight" {
        Norm
    } else if name.ends_with(".sinks") {
        Sinks
    } else if leaf == "bias" || name.ends_with("_bias") {
        Bias
    } else if name.starts_with("model.embed_tokens.") {
        EmbedTokens
    } else if name.starts_with("lm_head.") {
        LmHead
    } else if name.contains(".q_proj.") {
        QProj
    } else if name.contains(".k_proj.") {
        KProj
    } else if name.contains(".v_proj.") {
        VProj
    } else if name.contains(".o_proj.") {
        OProj
    } else if name.contains(".router.") {
        Router
    } else if name.contains(".gate_proj.") || name.contains(".gate_up_proj") {
        ExpertsGate
    } else if name.contains(".up_proj.") {
        ExpertsUp
    } else if name.contains(".down_proj") {
        ExpertsDown
    } else {
        return None;
    };
    Some((class, layer))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classify_round_trips_params() {
        let cfg = mixq_loader::GptOssConfig::from_json_str(
            r#"{"model_type":"gpt_oss","num_hidden_layers":2,"hidden_size":64,"intermediate_size":64,
            "num_local_experts":4,"num_experts_per_tok":2,"num_attention_heads":2,"num_key_value_heads":1,
            "head_dim":32,"vocab_size":100,"sliding_window":8}"#,
            std::path::Path::new("c.json"),
        )
        .unwrap();
        for p in mlx_params(&cfg) {
            assert_eq!(classify_name(&p.name()), Some((p.class, p.layer)), "{}", p.name());
        }
        assert_eq!(classify_name("model.layers.1.self_attn.q_proj.scales"), Some((TensorClass::QProj, Some(1))));
    }
}
