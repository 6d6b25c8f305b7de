//! The model schema: every parameter of a gpt-oss model as MLX names it, with its tensor class,
//! layer, logical shape and where its rows are in the upstream checkpoint, built once from a
//! validated config. Every job (plan, convert, verify, inspect, the runtimes, calibrate,
//! sensitivity) knows the model through this table.

use crate::config::{GptOssConfig, LayerType};
use crate::dtype::{Dtype, FloatDtype};
use crate::format::{TensorSpec, MXFP4_BLOCK};
use crate::rowmap::RowMap;

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

/// The activation a linear layer reads: calibration statistics are kept per input site, so the
/// layers that share an input (q/k/v; the router and the experts' gate/up) share them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum InputSite {
    /// A layer's input-normed hidden state, read by q_proj, k_proj and v_proj.
    Attention(usize),
    /// A layer's attention output, read by o_proj.
    AttentionOut(usize),
    /// A layer's post-attention-normed hidden state, read by the router and, for the tokens routed
    /// to each expert, by its gate_proj and up_proj.
    Mlp(usize),
    /// The SwiGLU output read by each expert's down_proj (every expert's own intermediate space).
    ExpertDown(usize),
    /// The final-normed hidden state, read by lm_head.
    Final,
}

impl InputSite {
    /// Every input site of the model a config describes, in model order.
    pub fn all(c: &GptOssConfig) -> Vec<InputSite> {
        (0..c.num_hidden_layers)
            .flat_map(|l| [InputSite::Attention(l), InputSite::AttentionOut(l), InputSite::Mlp(l), InputSite::ExpertDown(l)])
            .chain([InputSite::Final])
            .collect()
    }

    /// The site a weight of `class` in `layer` reads (`None` for the embedding, a lookup, and for
    /// parameters that are not linear weights).
    pub fn of(class: TensorClass, layer: Option<usize>) -> Option<InputSite> {
        use TensorClass::*;
        Some(match (class, layer) {
            (QProj | KProj | VProj, Some(l)) => InputSite::Attention(l),
            (OProj, Some(l)) => InputSite::AttentionOut(l),
            (Router | ExpertsGate | ExpertsUp, Some(l)) => InputSite::Mlp(l),
            (ExpertsDown, Some(l)) => InputSite::ExpertDown(l),
            (LmHead, None) => InputSite::Final,
            _ => return None,
        })
    }

    /// Features of the activation.
    pub fn width(self, c: &GptOssConfig) -> usize {
        match self {
            InputSite::AttentionOut(_) => c.num_attention_heads * c.head_dim,
            InputSite::ExpertDown(_) => c.intermediate_size,
            InputSite::Attention(_) | InputSite::Mlp(_) | InputSite::Final => c.hidden_size,
        }
    }

    /// Whether the site is read per expert (rows of the tokens routed to it) rather than only by
    /// every token.
    pub fn is_routed(self) -> bool {
        matches!(self, InputSite::Mlp(_) | InputSite::ExpertDown(_))
    }

    /// The stem statistics of this site are named by (`model.layers.3.mlp.input`).
    pub fn name(self) -> String {
        match self {
            InputSite::Attention(l) => format!("model.layers.{l}.self_attn.input"),
            InputSite::AttentionOut(l) => format!("model.layers.{l}.self_attn.o_proj.input"),
            InputSite::Mlp(l) => format!("model.layers.{l}.mlp.input"),
            InputSite::ExpertDown(l) => format!("model.layers.{l}.mlp.experts.down_proj.input"),
            InputSite::Final => "lm_head.input".to_string(),
        }
    }

    /// The layer the site belongs to (`None` for lm_head's input).
    pub fn layer(self) -> Option<usize> {
        match self {
            InputSite::Attention(l) | InputSite::AttentionOut(l) | InputSite::Mlp(l) | InputSite::ExpertDown(l) => Some(l),
            InputSite::Final => None,
        }
    }
}

/// Where a parameter's rows are in the upstream checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamRows {
    /// A BF16 tensor of the parameter's name and shape.
    Bf16 {
        /// The upstream tensor.
        tensor: String,
    },
    /// Every `step`-th element of each row of a BF16 tensor, from `start` (de-interleaved expert
    /// biases): output row `r`, element `j` is source element `r * cols * step + start + j * step`.
    Bf16Strided {
        /// The upstream tensor, `[..., cols * step]`.
        tensor: String,
        /// First source column.
        start: usize,
        /// Column stride.
        step: usize,
    },
    /// Dense expert weights stored transposed (transformers' layout): output row `r` (expert
    /// `r / per`, row `o = r % per` of it), element `j` is element `[r / per, j, start + o * step]`
    /// of a float tensor `[experts, cols, per * step]`.
    DenseTransposed {
        /// The source tensor.
        tensor: String,
        /// Output rows per expert.
        per: usize,
        /// First source column.
        start: usize,
        /// Column stride.
        step: usize,
    },
    /// MXFP4 expert rows: output row `r` is stored row `map.stored(r)` of the blocks and scales.
    Mxfp4 {
        /// `[experts, stored_rows, cols / 32, 16]` uint8 codes.
        blocks: String,
        /// `[experts, stored_rows, cols / 32]` uint8 E8M0 scales.
        scales: String,
        /// Output row to stored row.
        map: RowMap,
    },
}

/// Where the expert weights of a checkpoint are: the two layouts the parameter table reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SourceLayout {
    /// OpenAI's upstream files: MXFP4 expert blocks and scales, BF16 elsewhere.
    Mxfp4,
    /// transformers' `save_pretrained` of a dequantized model (fine-tunes): dense transposed
    /// experts with gate/up interleaved on the last axis, every tensor in one float type.
    Dense(FloatDtype),
}

impl SourceLayout {
    /// The float type of the layout's unquantized tensors (BF16 upstream).
    pub fn float_dtype(self) -> FloatDtype {
        match self {
            SourceLayout::Mxfp4 => FloatDtype::BF16,
            SourceLayout::Dense(f) => f,
        }
    }

    /// A short human name for reports, cards and manifests (`MXFP4 experts, BF16 rest`, as plan
    /// and the card have always named the upstream layout; `transformers dense BF16`).
    pub fn describe(self) -> String {
        match self {
            SourceLayout::Mxfp4 => "MXFP4 experts, BF16 rest".to_string(),
            SourceLayout::Dense(f) => format!("transformers dense {f}"),
        }
    }

    /// The layout a config alone implies (for planning without weights): upstream MXFP4 when
    /// `quantization_config.quant_method` is `mxfp4` (or for a converted MLX config, which keeps
    /// no trace of its source), else transformers' dense layout in the config's `torch_dtype` (or
    /// `dtype`): `float16` and `float32` as named, BF16 otherwise.
    pub fn of_config(c: &GptOssConfig) -> SourceLayout {
        if c.quant_method.as_deref() == Some("mxfp4") || c.quantization.is_some() {
            return SourceLayout::Mxfp4;
        }
        let named = ["torch_dtype", "dtype"].iter().find_map(|k| c.raw.get(*k).and_then(serde_json::Value::as_str));
        SourceLayout::Dense(match named {
            Some("float16") => FloatDtype::F16,
            Some("float32") => FloatDtype::F32,
            _ => FloatDtype::BF16,
        })
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
    /// Where its rows are in the upstream checkpoint.
    pub upstream: UpstreamRows,
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

    /// Rows: every dimension but the last, multiplied.
    pub fn rows(&self) -> usize {
        self.shape.iter().rev().skip(1).product()
    }

    /// Whether this is a weight MLX could quantize.
    pub fn is_quantizable(&self) -> bool {
        self.class.is_quantizable() && self.leaf == "weight"
    }

    /// The activation this weight multiplies (`None` for the embedding and non-weights).
    pub fn input_site(&self) -> Option<InputSite> {
        if self.leaf == "weight" {
            InputSite::of(self.class, self.layer)
        } else {
            None
        }
    }

    /// Parameters as mlx-lm counts them (sinks are not counted).
    pub fn counted_params(&self) -> usize {
        if self.class == TensorClass::Sinks {
            0
        } else {
            self.numel()
        }
    }

    /// The upstream tensors this parameter reads, with their dtypes and shapes.
    pub fn upstream_tensors(&self) -> Vec<TensorSpec> {
        self.source_tensors(SourceLayout::Mxfp4)
    }

    /// Where this parameter's rows are in a checkpoint of `layout`: the expert weights of a dense
    /// checkpoint are its transposed `gate_up_proj` / `down_proj` (the MXFP4 tensors' stem).
    pub fn rows_in(&self, layout: SourceLayout) -> UpstreamRows {
        match (&self.upstream, layout) {
            (UpstreamRows::Mxfp4 { blocks, map, .. }, SourceLayout::Dense(_)) => UpstreamRows::DenseTransposed {
                tensor: blocks.strip_suffix("_blocks").unwrap_or(blocks).to_string(),
                per: map.per,
                start: map.start,
                step: map.step,
            },
            (rows, _) => rows.clone(),
        }
    }

    /// The tensors this parameter reads in a checkpoint of `layout`, with their dtypes and shapes.
    pub fn source_tensors(&self, layout: SourceLayout) -> Vec<TensorSpec> {
        let cols = self.in_features();
        let outer = &self.shape[..self.shape.len().saturating_sub(1)];
        let float = layout.float_dtype().dtype();
        match &self.rows_in(layout) {
            UpstreamRows::Bf16 { tensor } => vec![TensorSpec { name: tensor.clone(), dtype: float, shape: self.shape.clone() }],
            UpstreamRows::Bf16Strided { tensor, step, .. } => {
                let shape = outer.iter().copied().chain([cols * step]).collect();
                vec![TensorSpec { name: tensor.clone(), dtype: float, shape }]
            }
            UpstreamRows::DenseTransposed { tensor, per, step, .. } => {
                let experts = self.rows() / per.max(&1);
                vec![TensorSpec { name: tensor.clone(), dtype: float, shape: vec![experts, cols, per * step] }]
            }
            UpstreamRows::Mxfp4 { blocks, scales, map } => {
                let experts = self.rows() / map.per.max(1);
                vec![
                    TensorSpec { name: blocks.clone(), dtype: Dtype::U8, shape: vec![experts, map.src_per, cols / MXFP4_BLOCK, 16] },
                    TensorSpec { name: scales.clone(), dtype: Dtype::U8, shape: vec![experts, map.src_per, cols / MXFP4_BLOCK] },
                ]
            }
        }
    }
}

/// Every parameter of the MLX gpt-oss model for a config, in model order.
pub fn mlx_params(c: &GptOssConfig) -> Vec<Param> {
    use TensorClass::*;
    let (h, i, e, v) = (c.hidden_size, c.intermediate_size, c.num_local_experts, c.vocab_size);
    let q = c.num_attention_heads * c.head_dim;
    let kv = c.num_key_value_heads * c.head_dim;
    let p = |class, layer: Option<usize>, module: String, leaf: &'static str, shape: &[usize]| {
        let tensor = format!("{module}.{leaf}");
        Param {
            class,
            layer,
            layer_type: layer.and_then(|l| c.layer_types.get(l).copied()),
            module,
            leaf,
            shape: shape.to_vec(),
            upstream: UpstreamRows::Bf16 { tensor },
        }
    };
    // Experts: MLX's gate/up/down modules read the upstream interleaved gate_up (even rows gate,
    // odd rows up) and down MXFP4 tensors in place; their biases de-interleave the same way.
    let expert = |l: usize, name: &str, class, stem: &str, start: usize, step: usize, shape: [usize; 3]| {
        let module = format!("model.layers.{l}.mlp.experts.{name}");
        let up = format!("model.layers.{l}.mlp.experts.{stem}");
        let src_per = shape[1] * step;
        let weight = Param {
            upstream: UpstreamRows::Mxfp4 {
                blocks: format!("{up}_blocks"),
                scales: format!("{up}_scales"),
                map: RowMap { per: shape[1], src_per, start, step },
            },
            ..p(class, Some(l), module.clone(), "weight", &shape)
        };
        let bias = Param {
            upstream: UpstreamRows::Bf16Strided { tensor: format!("{up}_bias"), start, step },
            ..p(Bias, Some(l), module, "bias", &shape[..2])
        };
        [weight, bias]
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
        ]);
        out.extend(expert(l, "gate_proj", ExpertsGate, "gate_up_proj", 0, 2, [e, i, h]));
        out.extend(expert(l, "up_proj", ExpertsUp, "gate_up_proj", 1, 2, [e, i, h]));
        out.extend(expert(l, "down_proj", ExpertsDown, "down_proj", 0, 1, [e, h, i]));
    }
    out.push(p(Norm, None, "model.norm".into(), "weight", &[h]));
    out.push(p(LmHead, None, "lm_head".into(), "weight", &[v, h]));
    out
}

/// The parameter table of one model, indexed by tensor name.
#[derive(Debug, Clone)]
pub struct Schema {
    params: Vec<Param>,
    by_name: std::collections::HashMap<String, usize>,
}

impl Schema {
    /// The parameters of the model a config describes.
    pub fn new(c: &GptOssConfig) -> Self {
        let params = mlx_params(c);
        let by_name = params.iter().enumerate().map(|(i, p)| (p.name(), i)).collect();
        Schema { params, by_name }
    }

    /// Every parameter, in model order.
    pub fn params(&self) -> &[Param] {
        &self.params
    }

    /// The parameter of an unquantized tensor name (`model.layers.0.self_attn.q_proj.weight`).
    pub fn param(&self, name: &str) -> Result<&Param, crate::error::LoaderError> {
        self.by_name
            .get(name)
            .map(|&i| &self.params[i])
            .ok_or_else(|| crate::error::LoaderError::tensor(name, "is not a parameter of the gpt-oss model"))
    }
}

/// Every tensor of the upstream gpt-oss layout for a config, in a stable order (the model-wide
/// tensors first, then layer by layer), derived from the parameter table.
pub fn upstream_tensors(c: &GptOssConfig) -> Vec<TensorSpec> {
    source_tensors(c, SourceLayout::Mxfp4)
}

/// Every tensor of a checkpoint of `layout` for a config, in the order of [`upstream_tensors`].
pub fn source_tensors(c: &GptOssConfig, layout: SourceLayout) -> Vec<TensorSpec> {
    let params = mlx_params(c);
    let (global, layered): (Vec<&Param>, Vec<&Param>) = params.iter().partition(|p| p.layer.is_none());
    let mut seen = std::collections::HashSet::new();
    let mut out: Vec<TensorSpec> = Vec::new();
    for p in global.into_iter().chain(layered) {
        for t in p.source_tensors(layout) {
            if seen.insert(t.name.clone()) {
                out.push(t);
            }
        }
    }
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

    fn config() -> GptOssConfig {
        GptOssConfig::from_json_str(
            r#"{"model_type":"gpt_oss","num_hidden_layers":2,"hidden_size":64,"intermediate_size":64,
            "num_local_experts":4,"num_experts_per_tok":2,"num_attention_heads":2,"num_key_value_heads":1,
            "head_dim":32,"vocab_size":100,"sliding_window":8}"#,
            std::path::Path::new("c.json"),
        )
        .unwrap()
    }

    #[test]
    fn classify_round_trips_params() {
        for p in mlx_params(&config()) {
            assert_eq!(classify_name(&p.name()), Some((p.class, p.layer)), "{}", p.name());
        }
        assert_eq!(classify_name("model.layers.1.self_attn.q_proj.scales"), Some((TensorClass::QProj, Some(1))));
    }

    #[test]
    fn every_linear_weight_has_an_input_site_of_its_width() {
        let c = config();
        let mut sites = std::collections::BTreeSet::new();
        for p in mlx_params(&c) {
            match p.input_site() {
                Some(site) => {
                    assert_eq!(site.width(&c), p.in_features(), "{}", p.name());
                    assert_eq!(site.layer(), p.layer);
                    sites.insert(site);
                }
                None => assert!(p.class == TensorClass::EmbedTokens || p.leaf != "weight" || !p.is_quantizable(), "{}", p.name()),
            }
        }
        assert_eq!(sites, InputSite::all(&c).into_iter().collect());
    }

    #[test]
    fn upstream_tensors_are_the_upstream_layout() {
        let t = upstream_tensors(&config());
        // 3 model-wide tensors, and 19 per layer (the experts' 6 shared by gate, up and down).
        assert_eq!(t.len(), 3 + 2 * 19);
        assert_eq!(t[0].name, "model.embed_tokens.weight");
        assert_eq!(t[1].name, "model.norm.weight");
        let blocks = t.iter().find(|x| x.name == "model.layers.1.mlp.experts.gate_up_proj_blocks").unwrap();
        assert_eq!((blocks.dtype, blocks.shape.clone()), (Dtype::U8, vec![4, 128, 2, 16]));
        let bias = t.iter().find(|x| x.name == "model.layers.0.mlp.experts.down_proj_bias").unwrap();
        assert_eq!(bias.shape, vec![4, 64]);
        let names: std::collections::BTreeSet<_> = t.iter().map(|x| &x.name).collect();
        assert_eq!(names.len(), t.len(), "no tensor twice");
    }
}
