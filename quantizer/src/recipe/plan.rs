//! Allocation of a recipe over a model, and its sizes, from config.json alone.

use std::collections::BTreeMap;

use mixq_loader::{GptOssConfig, QuantMode, QuantSpec, SourceLayout, TensorSpec};

use mixq_loader::schema::{mlx_params, Param, TensorClass};
use crate::recipe::language::{QuantFormat, Recipe, RecipeError};
use crate::kernels::method::QuantMethod;

/// A parameter with the action the recipe gives it.
#[derive(Debug, Clone, PartialEq)]
pub struct Assigned {
    /// The parameter.
    pub param: Param,
    /// What happens to it.
    pub action: QuantFormat,
    /// YAML line of the deciding rule (0: kept by default, no rule matched).
    pub rule_line: usize,
    /// The quantizer the deciding rule asks for (`None`: the conversion's default).
    pub quantizer: Option<QuantMethod>,
}

impl Assigned {
    /// The tensors this parameter becomes in the MLX checkpoint.
    pub fn outputs(&self) -> Vec<TensorSpec> {
        self.action.outputs(&self.param.module, self.param.leaf, &self.param.shape)
    }

    /// The quantization-map entry of this parameter's module, if quantized.
    pub fn quant_spec(&self) -> Option<QuantSpec> {
        self.action.spec()
    }

    /// Parameters as mlx-lm counts them (sinks are not counted; quantized weights count their elements).
    pub fn counted_params(&self) -> usize {
        self.param.counted_params()
    }

    /// Bytes of all its output tensors.
    pub fn nbytes(&self) -> usize {
        self.action.nbytes(&self.param.shape)
    }
}

/// A recipe resolved against a model config.
#[derive(Debug, Clone)]
pub struct Allocation {
    /// Every parameter with its action, in model order.
    pub assigned: Vec<Assigned>,
    /// Layer count of the model.
    pub num_layers: usize,
}

impl Allocation {
    /// Resolves every parameter of the config against the recipe, checking that each quantizable
    /// weight is matched and that group sizes divide input dimensions.
    pub fn resolve(config: &GptOssConfig, recipe: &Recipe) -> Result<Self, RecipeError> {
        let n = config.num_hidden_layers;
        let mut assigned = Vec::new();
        for param in mlx_params(config) {
            let (action, rule_line, quantizer) = match recipe.rule_for(&param, n) {
                Some(rule) => (rule.action, rule.line, rule.quantizer),
                None if param.is_quantizable() => {
                    return Err(RecipeError::Tensor {
                        origin: recipe.origin.clone(),
                        line: 0,
                        message: format!(
                            "tensor {} (class {}{}) is matched by no rule; add a rule for it (keep, affine or mxfp4)",
                            param.name(),
                            param.class.as_str(),
                            param.layer.map(|l| format!(", layer {l}")).unwrap_or_default()
                        ),
                    })
                }
                None => (QuantFormat::Bf16, 0, None),
            };
            let cols = param.in_features();
            let divisor = action.input_multiple();
            if cols % divisor != 0 {
                return Err(RecipeError::Tensor {
                    origin: recipe.origin.clone(),
                    line: rule_line,
                    message: format!(
                        "{action} needs the input dimension of {} ({cols}) to be divisible by {divisor}; choose another group size",
                        param.name()
                    ),
                });
            }
            assigned.push(Assigned { param, action, rule_line, quantizer });
        }
        Ok(Allocation { assigned, num_layers: n })
    }

    /// The rules of `recipe` that decide no parameter of this model, each as
    /// `origin:line: why it has no effect`.
    pub fn unused_rules(&self, recipe: &Recipe) -> Vec<String> {
        let n = self.num_layers;
        recipe
            .rules
            .iter()
            .filter(|rule| !self.assigned.iter().any(|a| a.rule_line == rule.line))
            .map(|rule| {
                let classes: Vec<&str> = rule.classes.iter().map(|c| c.as_str()).collect();
                let why = if self.assigned.iter().any(|a| rule.matches(&a.param, n)) {
                    "every tensor it selects is decided by an earlier rule".to_string()
                } else {
                    format!("it selects no tensor of this model ({n} layers)")
                };
                format!("{}:{}: rule for {} has no effect: {why}", recipe.origin, rule.line, classes.join(", "))
            })
            .collect()
    }

    /// All output tensors, in model order.
    pub fn outputs(&self) -> Vec<TensorSpec> {
        self.assigned.iter().flat_map(Assigned::outputs).collect()
    }

    /// Totals and per-action rows.
    pub fn summary(&self) -> PlanSummary {
        let mut rows: BTreeMap<ActionKey, PlanRow> = BTreeMap::new();
        for a in &self.assigned {
            let row = rows.entry(ActionKey(a.action)).or_insert_with(|| PlanRow {
                action: a.action,
                params: 0,
                bytes: 0,
                coverage: BTreeMap::new(),
            });
            row.params += a.counted_params();
            row.bytes += a.nbytes();
            row.coverage.entry(a.param.class).or_default().push(a.param.layer);
        }
        let rows: Vec<PlanRow> = rows.into_values().collect();
        let bytes = rows.iter().map(|r| r.bytes).sum();
        let params = rows.iter().map(|r| r.params).sum();
        PlanSummary { rows, bytes, params, num_layers: self.num_layers }
    }

    /// The most common affine setting by parameters: the quantization map's top-level default.
    pub fn default_spec(&self) -> Option<QuantSpec> {
        let mut by_spec: BTreeMap<(u32, u32, bool), usize> = BTreeMap::new();
        for a in &self.assigned {
            if let Some(s) = a.quant_spec() {
                *by_spec.entry((s.bits, s.group_size, s.mode == QuantMode::Affine)).or_default() += a.param.numel();
            }
        }
        let best = by_spec.iter().max_by_key(|(k, n)| (k.2, **n))?;
        let (bits, group_size, affine) = *best.0;
        Some(QuantSpec { bits, group_size, mode: if affine { QuantMode::Affine } else { QuantMode::Mxfp4 } })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ActionKey(QuantFormat);

impl PartialOrd for ActionKey {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for ActionKey {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        // bf16 first, then by decreasing bits.
        let rank = |a: &QuantFormat| match *a {
            QuantFormat::Bf16 => (0, 0, 0),
            QuantFormat::Affine { bits, group_size } => (1, 100 - bits, group_size),
            QuantFormat::Mxfp4 => (1, 96, 32),
        };
        rank(&self.0).cmp(&rank(&other.0))
    }
}

/// One line of the plan table: an action and what it covers.
#[derive(Debug, Clone)]
pub struct PlanRow {
    /// The action.
    pub action: QuantFormat,
    /// Parameters (as mlx-lm counts them).
    pub params: usize,
    /// Bytes written.
    pub bytes: usize,
    /// Classes covered, with the layer of each covered parameter.
    pub coverage: BTreeMap<TensorClass, Vec<Option<usize>>>,
}

impl PlanRow {
    /// Bits of the action as a table label.
    pub fn bits_label(&self) -> String {
        match self.action {
            QuantFormat::Bf16 => "bf16".into(),
            QuantFormat::Affine { bits, .. } => bits.to_string(),
            QuantFormat::Mxfp4 => "mxfp4".into(),
        }
    }

    /// Group size label.
    pub fn group_label(&self) -> String {
        match self.action {
            QuantFormat::Bf16 => "-".into(),
            QuantFormat::Affine { group_size, .. } => group_size.to_string(),
            QuantFormat::Mxfp4 => "32".into(),
        }
    }

    /// What the row covers: classes with their layers, classes sharing a layer set merged.
    pub fn covers(&self, num_layers: usize) -> String {
        let mut groups: Vec<(Vec<&str>, String)> = Vec::new();
        for (class, layers) in &self.coverage {
            let mut ls: Vec<usize> = layers.iter().flatten().copied().collect();
            ls.sort_unstable();
            ls.dedup();
            let where_ = if ls.is_empty() {
                String::new()
            } else if ls.len() == num_layers {
                "all layers".into()
            } else {
                format!("layers {}", compress_ranges(&ls))
            };
            match groups.iter_mut().find(|(_, w)| *w == where_) {
                Some((names, _)) => names.push(class.as_str()),
                None => groups.push((vec![class.as_str()], where_)),
            }
        }
        groups
            .iter()
            .map(|(names, w)| if w.is_empty() { names.join(", ") } else { format!("{} ({w})", names.join(", ")) })
            .collect::<Vec<_>>()
            .join("; ")
    }
}

/// "0-5, 7, 9, 30-35" from sorted distinct indices.
pub fn compress_ranges(sorted: &[usize]) -> String {
    let mut parts = Vec::new();
    let mut i = 0;
    while i < sorted.len() {
        let mut j = i;
        while j + 1 < sorted.len() && sorted[j + 1] == sorted[j] + 1 {
            j += 1;
        }
        parts.push(if i == j { sorted[i].to_string() } else { format!("{}-{}", sorted[i], sorted[j]) });
        i = j + 1;
    }
    parts.join(", ")
}

/// Sizes of a planned conversion.
#[derive(Debug, Clone)]
pub struct PlanSummary {
    /// Per-action rows, bf16 first.
    pub rows: Vec<PlanRow>,
    /// Total bytes of tensor data.
    pub bytes: usize,
    /// Total parameters (mlx-lm's count).
    pub params: usize,
    /// Layer count.
    pub num_layers: usize,
}

impl PlanSummary {
    /// Bits per weight, as mlx-lm computes it: 8 * bytes / parameters.
    pub fn bits_per_weight(&self) -> f64 {
        mixq_loader::bits_per_weight(self.bytes, self.params)
    }
}

/// The size of a source checkpoint: its layout, tensor bytes and parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourceSize {
    /// Where and in what type its weights are.
    pub layout: SourceLayout,
    /// Tensor bytes.
    pub bytes: usize,
    /// Parameters (mlx-lm's count).
    pub params: usize,
}

/// Bytes and parameters of the source checkpoint of `layout` a config describes.
pub fn source_size(config: &GptOssConfig, layout: SourceLayout) -> SourceSize {
    let bytes = mixq_loader::schema::source_tensors(config, layout).iter().map(TensorSpec::nbytes).sum();
    let params = mlx_params(config).iter().map(Param::counted_params).sum();
    SourceSize { layout, bytes, params }
}
