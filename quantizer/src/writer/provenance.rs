//! How a conversion chose its affine scales and biases: the quantizer of each affine module and
//! the calibration behind the `mse` search, recorded in the manifest and the model card.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use crate::kernels::importance::CalibrationUse;
use crate::recipe::plan::Allocation;
use crate::recipe::language::QuantFormat;
use crate::kernels::method::QuantMethod;

/// Where the calibration statistics came from.
#[derive(Debug, Clone, PartialEq)]
pub struct CalibrationRecord {
    /// sha256 of the statistics file.
    pub file_sha256: String,
    /// sha256 of the calibration text.
    pub text_sha256: String,
    /// Tokens the statistics were gathered over.
    pub tokens: u64,
    /// Window length of the calibration run.
    pub ctx: usize,
}

/// The quantizers and calibration of one conversion.
#[derive(Debug, Clone, PartialEq)]
pub struct Provenance {
    /// The conversion's default quantizer.
    pub default: QuantMethod,
    /// Affine modules per quantizer actually used.
    pub modules: BTreeMap<QuantMethod, usize>,
    /// The calibration, when one weighted the `mse` search.
    pub calibration: Option<CalibrationRecord>,
}

impl Provenance {
    /// The provenance of converting `alloc` with `default` and optional statistics.
    pub fn of(alloc: &Allocation, default: QuantMethod, calibration: Option<&CalibrationUse>) -> Self {
        let mut modules = BTreeMap::new();
        for a in alloc.assigned.iter().filter(|a| matches!(a.action, QuantFormat::Affine { .. })) {
            *modules.entry(a.quantizer.unwrap_or(default)).or_insert(0) += 1;
        }
        let calibrated = modules.contains_key(&QuantMethod::Mse) || modules.contains_key(&QuantMethod::Gptq);
        let calibration = calibration.filter(|_| calibrated).map(|c| CalibrationRecord {
            file_sha256: c.file_sha256.clone(),
            text_sha256: c.stats.text_sha256.clone(),
            tokens: c.stats.tokens,
            ctx: c.stats.ctx,
        });
        Provenance { default, modules, calibration }
    }

    /// The manifest's `quantizer` object.
    pub fn to_json(&self) -> Value {
        let modules: serde_json::Map<String, Value> = self.modules.iter().map(|(m, n)| (m.as_str().to_string(), json!(n))).collect();
        json!({
            "default": self.default.as_str(),
            "affine_modules": modules,
            "calibration": self.calibration.as_ref().map(|c| json!({
                "file_sha256": c.file_sha256,
                "text_sha256": c.text_sha256,
                "tokens": c.tokens,
                "ctx": c.ctx,
            })),
        })
    }

    /// One paragraph for the model card.
    pub fn card_text(&self) -> String {
        if self.modules.is_empty() {
            return "No affine-quantized modules.".into();
        }
        let parts: Vec<String> = self
            .modules
            .iter()
            .map(|(m, n)| {
                let what = match m {
                    QuantMethod::MinMax => "min-max, as `mx.quantize`",
                    QuantMethod::Mse => "error-minimising search",
                    QuantMethod::Gptq => "error-minimising search with GPTQ error feedback through the input Hessians",
                };
                format!("`{m}` ({what}) for {n} module(s)")
            })
            .collect();
        let calib = match &self.calibration {
            Some(c) if self.modules.contains_key(&QuantMethod::Gptq) => format!(
                " The input statistics (mean x² per channel and the inputs' second-moment matrices) were \
                 measured over {} tokens (context {}) of calibration text with sha256 `{}` (statistics \
                 file sha256 `{}`).",
                c.tokens, c.ctx, c.text_sha256, c.file_sha256
            ),
            Some(c) => format!(
                " The `mse` search weighted each input channel by its mean x² measured over {} tokens \
                 (context {}) of calibration text with sha256 `{}` (statistics file sha256 `{}`).",
                c.tokens, c.ctx, c.text_sha256, c.file_sha256
            ),
            None if self.modules.contains_key(&QuantMethod::Mse) => " The `mse` search was unweighted (no calibration).".into(),
            None => String::new(),
        };
        format!("Affine scales and biases were chosen by {}.{calib}", parts.join(", "))
    }
}
