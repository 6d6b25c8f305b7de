//! The sensitivity file (`mixq sensitivity`): for every unit a recipe can address (a quantizable
//! tensor class in one layer, or a global one), the size and the predicted cost of each setting.

use std::path::Path;

use serde::{Deserialize, Serialize};

use mixq_loader::schema::{mlx_params, Param, TensorClass};
use mixq_loader::QuantFormat;

/// Value of the `format` field.
pub const SENSITIVITY_FORMAT: &str = "mixq-sensitivity/1";

/// How a setting stores a unit's weights.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SettingMode {
    /// MLX affine: `bits` × `group_size` with bf16 scales and biases.
    #[default]
    Affine,
    /// MLX mxfp4 (experts only): 4-bit E2M1 codes, an E8M0 scale per 32; upstream blocks pass through.
    Mxfp4,
}

impl SettingMode {
    /// Whether this is the affine mode (the field's default, left out of the file).
    pub fn is_affine(&self) -> bool {
        *self == SettingMode::Affine
    }
}

/// One setting of a unit: affine bits × group size, or mxfp4.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SettingCost {
    /// `affine` (absent in the file) or `mxfp4`.
    #[serde(default, skip_serializing_if = "SettingMode::is_affine")]
    pub mode: SettingMode,
    /// Bits per code.
    pub bits: u32,
    /// Elements per scale/bias (or per E8M0 scale).
    pub group_size: u32,
    /// Bytes of the unit's tensors at this setting.
    pub bytes: u64,
    /// The (importance-weighted) squared error of the unit's weights at this setting.
    pub proxy: f64,
    /// Predicted mean KL(source ‖ model with only this unit quantized) on the text.
    pub cost: f64,
    /// The cheap estimate of that KL (entry error times the site's response), where computed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub estimate: Option<f64>,
}

/// A unit: one quantizable tensor class in one layer (or a global one).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UnitCost {
    /// The recipe class (`q_proj`, `experts_down`, `lm_head`, ...).
    pub class: String,
    /// Its layer, if it has one.
    pub layer: Option<usize>,
    /// The MLX module.
    pub module: String,
    /// Parameters.
    pub params: u64,
    /// Bytes kept in bf16.
    pub bf16_bytes: u64,
    /// KL measured with only this unit quantized at the reference setting.
    pub measured_kl: Option<f64>,
    /// KL measured at the second setting, if one was measured: `[bits, group_size, kl]`.
    pub second_kl: Option<(u32, u32, f64)>,
    /// The exponent of `cost ∝ proxy^exponent` that carries the measured KL to other settings.
    pub exponent: Option<f64>,
    /// Every setting measured, sorted by bytes.
    pub settings: Vec<SettingCost>,
}

impl SettingCost {
    /// The storage format of this setting.
    pub fn format(&self) -> QuantFormat {
        match self.mode {
            SettingMode::Affine => QuantFormat::Affine { bits: self.bits, group_size: self.group_size },
            SettingMode::Mxfp4 => QuantFormat::Mxfp4,
        }
    }

    /// `3-bit gs64` or `mxfp4`.
    pub fn label(&self) -> String {
        match self.mode {
            SettingMode::Affine => format!("{}-bit gs{}", self.bits, self.group_size),
            SettingMode::Mxfp4 => "mxfp4".into(),
        }
    }
}

impl UnitCost {
    /// The unit's affine setting `(bits, group_size)`, if it was measured.
    pub fn setting(&self, (bits, group_size): (u32, u32)) -> Option<&SettingCost> {
        self.settings.iter().find(|s| s.mode.is_affine() && (s.bits, s.group_size) == (bits, group_size))
    }

    /// The unit of parameter `p` with the given settings, nothing measured yet.
    pub fn new(p: &Param, settings: Vec<SettingCost>) -> Self {
        UnitCost {
            class: p.class.as_str().to_string(),
            layer: p.layer,
            module: p.module.clone(),
            params: p.numel() as u64,
            bf16_bytes: 2 * p.numel() as u64,
            measured_kl: None,
            second_kl: None,
            exponent: None,
            settings,
        }
    }
}

/// What the real cheap run on a model of this shape would cost, projected from a synthetic run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunCost {
    /// Threads the rates were measured on.
    pub threads: usize,
    /// Probe tokens the estimate would run.
    pub probe_tokens: usize,
    /// Weights quantized (every unit at every setting).
    pub weights_quantized: f64,
    /// Seconds of quantization at the measured rate.
    pub quantize_seconds: f64,
    /// Floating-point operations of the estimate's model runs.
    pub model_flops: f64,
    /// Seconds of those runs at the measured rate.
    pub model_seconds: f64,
    /// The runtime's measured product rate, FLOP/s.
    pub flops_per_second: f64,
    /// Peak memory beyond the memory-mapped checkpoint, bytes.
    pub peak_bytes: u64,
}

/// A sensitivity file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sensitivity {
    /// `mixq-sensitivity/1`.
    pub format: String,
    /// How the model was named.
    pub model: String,
    /// sha256 of the model's architecture fields (as in calibration files).
    pub config_sha256: String,
    /// sha256 of the text the KL was measured on, if any.
    pub text_sha256: Option<String>,
    /// Tokens the KL was measured on (0: proxy only).
    pub tokens: usize,
    /// sha256 of the calibration statistics that weighted the error, if any.
    pub calibration_sha256: Option<String>,
    /// The quantizer the settings were measured with.
    pub quantizer: String,
    /// The setting whose KL was measured per unit: `[bits, group_size]`.
    pub reference_setting: (u32, u32),
    /// A second setting measured per unit, fixing each unit's exponent.
    pub second_setting: Option<(u32, u32)>,
    /// `kl` when costs are measured KL scaled by the proxy, `proxy` when they are the proxy alone.
    pub cost_kind: String,
    /// Spearman rank correlation between the cheap estimate and the measured KL over the units
    /// (at the reference setting).
    pub rank_correlation: Option<f64>,
    /// Spearman rank correlation between the weight-error proxy and the measured KL.
    #[serde(default)]
    pub proxy_rank_correlation: Option<f64>,
    /// Tokens the cheap estimate ran on (windows the model wrote itself; 0: none).
    #[serde(default)]
    pub probe_tokens: usize,
    /// For synthetic weights: what the real cheap run would cost.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub real_run: Option<RunCost>,
    /// Seconds the measurement took.
    pub seconds: f64,
    /// The units.
    pub units: Vec<UnitCost>,
}

/// A sensitivity file that cannot be read or does not fit a model.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {message}")]
pub struct SensitivityError {
    /// The file.
    pub path: String,
    /// What is wrong.
    pub message: String,
}

impl Sensitivity {
    /// Reads and checks a sensitivity file.
    pub fn read(path: &Path) -> Result<Self, SensitivityError> {
        let bad = |message: String| SensitivityError { path: path.display().to_string(), message };
        let bytes = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
        let text = String::from_utf8(bytes)
            .map_err(|_| bad("not a sensitivity file: it is not text (expected the JSON that `mixq sensitivity --out` writes)".into()))?;
        let s: Sensitivity = serde_json::from_str(&text).map_err(|e| bad(format!("not a sensitivity file: {e}")))?;
        if s.format != SENSITIVITY_FORMAT {
            return Err(bad(format!("format is \"{}\", expected \"{SENSITIVITY_FORMAT}\"", s.format)));
        }
        for u in &s.units {
            if TensorClass::parse_group(&u.class).is_none_or(|c| c.len() != 1) {
                return Err(bad(format!("unit {}: unknown class \"{}\"", u.module, u.class)));
            }
            if let Some(x) = u.settings.iter().find(|x| !(x.cost.is_finite() && x.cost >= 0.0 && x.proxy.is_finite())) {
                return Err(bad(format!("unit {}: setting {} has cost {}", u.module, x.label(), x.cost)));
            }
            let expert = TensorClass::parse_group(&u.class).is_some_and(|c| c[0].is_expert());
            if let Some(x) = u.settings.iter().find(|x| x.mode == SettingMode::Mxfp4 && !(expert && (x.bits, x.group_size) == (4, 32))) {
                return Err(bad(format!(
                    "unit {}: setting mxfp4 with bits {} and group size {}; mxfp4 is 4 bits per 32 and only for experts",
                    u.module, x.bits, x.group_size
                )));
            }
        }
        Ok(s)
    }

    /// Writes it as pretty JSON.
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        let mut text = serde_json::to_string_pretty(self).expect("sensitivity serializes");
        text.push('\n');
        std::fs::write(path, text)
    }
}

/// The units of a model: every quantizable weight but the ones of `skip` classes.
pub fn units(config: &mixq_loader::GptOssConfig) -> Vec<Param> {
    mlx_params(config).into_iter().filter(Param::is_quantizable).collect()
}

/// Bytes of a `[.., rows, cols]` weight in `format`.
pub fn format_bytes(p: &Param, format: QuantFormat) -> u64 {
    (p.rows() * format.row_bytes(p.in_features())) as u64
}

/// Spearman rank correlation of two equally long samples (average ranks for ties).
pub fn spearman(a: &[f64], b: &[f64]) -> Option<f64> {
    if a.len() != b.len() || a.len() < 3 {
        return None;
    }
    let ranks = |x: &[f64]| -> Vec<f64> {
        let mut idx: Vec<usize> = (0..x.len()).collect();
        idx.sort_by(|&i, &j| x[i].total_cmp(&x[j]));
        let mut r = vec![0.0; x.len()];
        let mut i = 0;
        while i < idx.len() {
            let mut j = i;
            while j + 1 < idx.len() && x[idx[j + 1]] == x[idx[i]] {
                j += 1;
            }
            for &k in &idx[i..=j] {
                r[k] = (i + j) as f64 / 2.0;
            }
            i = j + 1;
        }
        r
    };
    let (ra, rb) = (ranks(a), ranks(b));
    let n = a.len() as f64;
    let mean = (n - 1.0) / 2.0;
    let cov: f64 = ra.iter().zip(&rb).map(|(x, y)| (x - mean) * (y - mean)).sum();
    let va: f64 = ra.iter().map(|x| (x - mean).powi(2)).sum();
    let vb: f64 = rb.iter().map(|y| (y - mean).powi(2)).sum();
    (va > 0.0 && vb > 0.0).then(|| cov / (va * vb).sqrt())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spearman_of_monotone_and_reversed() {
        let a = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(spearman(&a, &[10.0, 20.0, 25.0, 100.0]), Some(1.0));
        assert_eq!(spearman(&a, &[4.0, 3.0, 2.0, 1.0]), Some(-1.0));
        assert!(spearman(&a, &[1.0, 1.0, 1.0, 1.0]).is_none());
    }
}
