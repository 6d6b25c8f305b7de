//! `mixq sensitivity`: for every unit a recipe can address (a quantizable tensor class in one
//! layer, or a global one), what quantizing that unit alone costs at each bits × group size.
//!
//! Each setting records the unit's relative (calibration-weighted) squared weight error, the
//! proxy: Σ_rows Σ_j E[x_j²]·(ŵ_j − w_j)² over Σ_rows Σ_j E[x_j²]·w_j², each expert's rows weighted
//! by the fraction of tokens routed to it. The cost is one of two:
//! - without a text, the cheap estimate of [`crate::estimate`]: the unit's KL on a probe the
//!   model writes itself, measured at two settings from the stored residual stream (only the
//!   unit's block and what follows it run), carried to the other settings by the unit's exact
//!   error where it enters the residual stream;
//! - with a text, the KL measured twice per unit: the mean KL(source ‖ model with only this unit
//!   quantized) at the reference setting and at a second one, which fix the unit's exponent in
//!   `KL ∝ proxy^e` and carry the measured KL to every other setting. The estimate is computed
//!   too, and the rank correlations of the estimate and of the proxy with the measured KL say how
//!   far each ranks units without measuring (bundled model: about 0.93 and 0.1).

use std::path::Path;

use mixq_loader::{Checkpoint, FloatDtype, GptOssConfig, ModelFingerprint, QuantFormat};
use mixq_quantizer::kernels::affine::AFFINE_GROUP_SIZES;
use mixq_quantizer::kernels::importance::CalibrationUse;
use mixq_loader::schema::Param;
use mixq_quantizer::authoring::sensitivity_file::{format_bytes, spearman, units, SettingCost, SettingMode, Sensitivity, UnitCost, SENSITIVITY_FORMAT};
use mixq_quantizer::kernels::param_error::{quantize_unit, QuantizedUnit};
use mixq_quantizer::QuantMethod;
use mixq_runtime::matrix::Codes;
use mixq_runtime::{Engine, Model};
use rayon::prelude::*;

use crate::corpus::Corpus;
use crate::estimate::{generated_windows, Entry, Probe, SiteErrors};
use crate::eval::compare_full;
use crate::projection::{cheap_run_cost, measured_flops};
use crate::validate_job::Loader;
use crate::ValidateError;

/// Settings of a sensitivity measurement.
#[derive(Debug, Clone)]
pub struct SensitivityOptions {
    /// Bit widths to measure.
    pub bits: Vec<u32>,
    /// Group sizes to measure.
    pub group_sizes: Vec<u32>,
    /// The quantizer the settings are made with.
    pub quantizer: QuantMethod,
    /// The setting whose KL is measured per unit.
    pub reference: (u32, u32),
    /// A second setting measured per unit, fixing its exponent (`None`: [`DEFAULT_EXPONENT`]).
    pub second: Option<(u32, u32)>,
    /// Tokens of the text the KL is measured on (0: proxy only).
    pub tokens: usize,
    /// Window length.
    pub ctx: usize,
    /// Tokens the model writes itself for the cheap estimate (0: none).
    pub probe_tokens: usize,
}

/// A unit's KL measured on the probe where it was quantized at the measured settings, with its
/// entry errors there: (entry error per token, KL).
#[derive(Debug, Clone, Default)]
struct Anchor {
    points: Vec<(f64, f64)>,
}

impl Anchor {
    /// The KL of an entry error `error`: the first point's KL scaled by (error / its error)^e, e
    /// from the two points where both are usable, else the site's noise exponent (else 1).
    fn cost(&self, error: f64, site: Option<crate::estimate::SiteResponse>) -> Option<f64> {
        let &(e1, k1) = self.points.first()?;
        if !(e1 > 0.0 && k1 > 0.0) {
            return None;
        }
        if error <= 0.0 {
            return Some(0.0);
        }
        let exponent = self
            .points
            .get(1)
            .filter(|&&(e2, k2)| e2 > 0.0 && k2 > 0.0 && e2 != e1)
            .map(|&(e2, k2)| (k2 / k1).ln() / (e2 / e1).ln())
            .filter(|e| e.is_finite() && *e > 0.0)
            .or(site.map(|r| r.exponent))
            .unwrap_or(1.0);
        Some(k1 * (error / e1).powf(exponent))
    }
}

/// Where the weights come from.
pub enum SensitivitySource<'a> {
    /// A source checkpoint folder (upstream MXFP4 or transformers' dense layout), with optional
    /// text and calibration statistics.
    Checkpoint {
        /// The folder.
        dir: &'a Path,
        /// Opens the checkpoint on the backend that measures the KL (the CPU or the GPU).
        load: &'a Loader<'a, ValidateError>,
        /// Text to measure KL on.
        text: Option<&'a Path>,
        /// Calibration statistics weighting the proxy.
        calibration: Option<&'a Path>,
    },
    /// A config.json alone: deterministic heavy-tailed synthetic rows of each unit's width stand in
    /// for its weights (proxy only), so that large shapes are exercised without their files.
    Synthetic(&'a GptOssConfig),
}

/// The exponent of `KL ∝ proxy^e` where a unit has only one measurement (the median over the
/// bundled model's units).
pub const DEFAULT_EXPONENT: f64 = 0.65;

/// Rows of each unit sampled when the weights are synthetic.
const SYNTHETIC_ROWS: usize = 16;

/// The settings a unit is measured at: every affine bits × group size that divides its rows, and
/// mxfp4 for experts (MLX's format of the upstream experts: their blocks pass through exactly),
/// sorted by bytes.
fn settings_of(p: &Param, opts: &SensitivityOptions) -> Vec<QuantFormat> {
    let cols = p.in_features();
    let mut out: Vec<QuantFormat> = opts
        .bits
        .iter()
        .flat_map(|&bits| opts.group_sizes.iter().map(move |&group_size| QuantFormat::Affine { bits, group_size }))
        .filter(|f| matches!(*f, QuantFormat::Affine { group_size, .. } if cols.is_multiple_of(group_size as usize)))
        .collect();
    if p.class.is_expert() && cols.is_multiple_of(mixq_loader::format::MXFP4_BLOCK) {
        out.push(QuantFormat::Mxfp4);
    }
    out.sort_by_key(|&f| (format_bytes(p, f), f));
    out
}

/// The sensitivity file's record of a setting, its cost still the proxy.
fn setting_cost(p: &Param, format: QuantFormat, proxy: f64, estimate: Option<f64>) -> SettingCost {
    let (mode, bits, group_size) = match format {
        QuantFormat::Affine { bits, group_size } => (SettingMode::Affine, bits, group_size),
        _ => (SettingMode::Mxfp4, 4, mixq_loader::format::MXFP4_BLOCK as u32),
    };
    SettingCost { mode, bits, group_size, bytes: format_bytes(p, format), proxy, cost: proxy, estimate }
}

/// Measures the sensitivity of every unit; `progress(units_done, units_total)`.
pub fn sensitivity(
    source: &SensitivitySource<'_>,
    model_label: &str,
    opts: &SensitivityOptions,
    progress: &(dyn Fn(usize, usize) + Sync),
) -> Result<Sensitivity, ValidateError> {
    let start = std::time::Instant::now();
    if opts.quantizer.needs_hessians() {
        return Err(ValidateError::Input(format!(
            "--quantizer {}: sensitivity measures units quantized row by row (minmax or mse); gptq's error feedback is not modelled in it yet, so rank units with mse and convert with gptq",
            opts.quantizer
        )));
    }
    let among = |(b, g): (u32, u32)| opts.bits.contains(&b) && opts.group_sizes.contains(&g);
    let measures = matches!(source, SensitivitySource::Checkpoint { text: Some(_), .. }) && opts.tokens > 0;
    let opts = &if measures {
        if let Some((b, g)) = std::iter::once(opts.reference).chain(opts.second).find(|&s| !among(s)) {
            return Err(ValidateError::Input(format!("the measured setting {b}-bit gs{g} must be among --bits and --group-sizes")));
        }
        opts.clone()
    } else {
        // Nothing is measured: rank the units by the proxy at a setting that is computed.
        let fallback = (opts.bits.iter().copied().min().unwrap_or(3), opts.group_sizes.first().copied().unwrap_or(64));
        SensitivityOptions { reference: if among(opts.reference) { opts.reference } else { fallback }, second: opts.second.filter(|&s| among(s)), tokens: 0, ..opts.clone() }
    };
    match *source {
        SensitivitySource::Synthetic(config) => synthetic(config, model_label, opts, progress, start),
        SensitivitySource::Checkpoint { dir, load, text, calibration } => measured(dir, load, text, calibration, model_label, opts, progress, start),
    }
}

/// `f` of every window: on parallel threads for a CPU model, one window after another on a GPU.
fn per_window<T: Send>(
    model: &Engine<'_>,
    windows: &[&[u32]],
    f: impl Fn(usize, &[u32]) -> Result<T, ValidateError> + Sync,
) -> Result<Vec<T>, ValidateError> {
    if model.parallel() {
        windows.par_iter().enumerate().map(|(i, w)| f(i, w)).collect()
    } else {
        windows.iter().enumerate().map(|(i, w)| f(i, w)).collect()
    }
}

/// Mean KL(reference ‖ model) over every position of the windows.
pub(crate) fn mean_kl(model: &Engine<'_>, windows: &[&[u32]], reference: &[Vec<f32>], vocab: usize) -> Result<f64, ValidateError> {
    let sums = per_window(model, windows, |i, w| {
        let logits = model.logits(w)?;
        let sum: f64 = logits.chunks_exact(vocab).zip(reference[i].chunks_exact(vocab)).map(|(m, r)| compare_full(m, r, 0).kl).sum();
        Ok((sum, w.len()))
    })?;
    let (sum, count) = sums.iter().fold((0.0, 0), |(a, b), (s, c)| (a + s, b + c));
    Ok(sum / count.max(1) as f64)
}

#[allow(clippy::too_many_arguments)]
fn measured(
    dir: &Path,
    load: &Loader<'_, ValidateError>,
    text: Option<&Path>,
    calibration: Option<&Path>,
    model_label: &str,
    opts: &SensitivityOptions,
    progress: &(dyn Fn(usize, usize) + Sync),
    start: std::time::Instant,
) -> Result<Sensitivity, ValidateError> {
    let ckpt = Checkpoint::open(dir)?;
    if ckpt.format().source_layout().is_none() {
        return Err(ValidateError::Input(format!(
            "{}: sensitivity reads source gpt-oss checkpoints (upstream MXFP4 or transformers' dense layout); this one is {}",
            dir.display(),
            ckpt.format().describe()
        )));
    }
    let config = ckpt.config().clone();
    let calib = calibration.map(|p| CalibrationUse::open(p, &ckpt)).transpose()?;
    let (tokens, text_sha256) = measuring_tokens(dir, text, opts)?;
    let windows: Vec<&[u32]> = tokens.chunks(opts.ctx.max(2)).filter(|w| w.len() >= 2).collect();
    let vocab = config.vocab_size;
    // The proxy alone runs no model: a backend is loaded (a GPU upload) only to measure KL. The
    // cheap estimate runs on the CPU model, which only maps the checkpoint (and checks its layout).
    let cpu = Model::load(&ckpt)?;
    let model = if windows.is_empty() { None } else { Some(load(&ckpt)?) };
    let reference: Vec<Vec<f32>> = match &model {
        Some(m) => per_window(m, &windows, |_, w| Ok(m.logits(w)?))?,
        None => Vec::new(),
    };
    let probe = if opts.probe_tokens > 0 {
        let ctx = opts.ctx.clamp(2, opts.probe_tokens.max(2));
        Some(Probe::new(&cpu, &generated_windows(&cpu, opts.probe_tokens.div_ceil(ctx), ctx)?)?)
    } else {
        None
    };

    let params = units(&config);
    let mut out = Vec::with_capacity(params.len());
    let mut entries = Vec::with_capacity(params.len());
    let mut anchors: Vec<Anchor> = Vec::with_capacity(params.len());
    let mut site_errors = SiteErrors::new(cpu.residual_sites());
    for (n, p) in params.iter().enumerate() {
        let quantizer = UnitQuantizer::new(&ckpt, p, calib.as_ref(), opts.quantizer)?;
        let entry = Entry::of(p)?;
        let mut settings = Vec::new();
        let mut measured: Vec<((u32, u32), f64)> = Vec::new();
        let mut anchor = Anchor::default();
        for format in settings_of(p, opts) {
            let q = quantizer.quantize(format)?;
            let codes = unit_codes(&q);
            let changed = || cpu.with_weight(&p.module, codes);
            let affine = match format {
                QuantFormat::Affine { bits, group_size } => Some((bits, group_size)),
                _ => None,
            };
            let is_reference = affine == Some(opts.reference);
            let is_measured = is_reference || (affine.is_some() && affine == opts.second);
            if let (true, Some(model), Some(setting)) = (is_measured, &model, affine) {
                measured.push((setting, mean_kl(&model.with_weight(&p.module, codes)?, &windows, &reference, vocab)?));
            }
            // The estimate holds the entry error until the sites' responses are known (lm_head's
            // is its KL already). A setting without error (upstream experts kept in mxfp4) costs nothing.
            let estimate = match (&probe, entry) {
                (None, _) => None,
                (Some(_), _) if q.error == 0.0 => Some(0.0),
                (Some(probe), Entry::Head) => Some(probe.head_kl(&changed()?)),
                (Some(probe), _) => {
                    let err = probe.entry_error(&changed()?, entry, is_measured)?;
                    if let Some(kl) = err.kl {
                        site_errors.add(entry, &err, is_reference);
                        anchor.points.push((err.per_token, kl));
                    }
                    Some(err.per_token)
                }
            };
            let proxy = if q.signal > 0.0 { q.error / q.signal } else { q.error };
            settings.push(setting_cost(p, format, proxy, estimate));
        }
        let mut u = UnitCost::new(p, settings);
        carry_measured_kl(&mut u, &measured, opts);
        out.push(u);
        entries.push(entry);
        anchors.push(anchor);
        progress(n + 1, params.len());
    }
    if let Some(probe) = &probe {
        // One perturbation run (two with a second setting) per site, noise shaped as the mean
        // error of the site's units; each unit's entry error becomes a predicted KL.
        let responses = site_errors.responses(probe);
        for ((u, entry), anchor) in out.iter_mut().zip(&entries).zip(&anchors) {
            let response = entry.site().and_then(|s| responses[s]);
            for s in &mut u.settings {
                s.estimate = s.estimate.map(|x| anchor.cost(x, response).unwrap_or_else(|| response.map_or(x, |r| r.cost(x))));
                if windows.is_empty() {
                    s.cost = s.estimate.unwrap_or(s.cost);
                }
            }
        }
    }
    let at_reference = |f: &dyn Fn(&SettingCost) -> Option<f64>| -> Vec<f64> {
        out.iter().map(|u| u.setting(opts.reference).and_then(f).unwrap_or(0.0)).collect()
    };
    let (rank_correlation, proxy_rank_correlation) = if windows.is_empty() {
        (None, None)
    } else {
        let kl: Vec<f64> = out.iter().map(|u| u.measured_kl.unwrap_or(0.0)).collect();
        (
            probe.as_ref().and_then(|_| spearman(&at_reference(&|s| s.estimate), &kl)),
            spearman(&at_reference(&|s| Some(s.proxy)), &kl),
        )
    };
    let cost_kind = match (windows.is_empty(), &probe) {
        (false, _) => "kl",
        (true, Some(_)) => "estimate",
        (true, None) => "proxy",
    };
    Ok(Sensitivity {
        format: SENSITIVITY_FORMAT.into(),
        model: model_label.into(),
        config_sha256: ModelFingerprint::architecture_sha256(&config),
        text_sha256,
        tokens: windows.iter().map(|w| w.len()).sum(),
        calibration_sha256: calib.as_ref().map(|c| c.file_sha256.clone()),
        quantizer: opts.quantizer.as_str().into(),
        reference_setting: opts.reference,
        second_setting: opts.second.filter(|_| !windows.is_empty() || probe.is_some()),
        cost_kind: cost_kind.into(),
        rank_correlation,
        proxy_rank_correlation,
        probe_tokens: probe.as_ref().map_or(0, |p| p.tokens()),
        real_run: None,
        seconds: start.elapsed().as_secs_f64(),
        units: out,
    })
}

/// The tokens KL is measured on (none without `--text` or with `--tokens 0`) and the text's sha256.
fn measuring_tokens(dir: &Path, text: Option<&Path>, opts: &SensitivityOptions) -> Result<(Vec<u32>, Option<String>), ValidateError> {
    match text {
        Some(t) if opts.tokens > 0 => {
            let corpus = Corpus::read(dir, t, Some(opts.tokens))?;
            if corpus.tokens.len() < 2 {
                return Err(ValidateError::Input(format!("{}: fewer than 2 tokens to measure KL on", t.display())));
            }
            Ok((corpus.tokens, Some(corpus.sha256)))
        }
        _ => Ok((Vec::new(), None)),
    }
}

/// Quantizes one unit of a source checkpoint alone, at any setting, the way conversion would:
/// with the calibration's importance, and its error weighted by how often each expert is used.
pub(crate) struct UnitQuantizer<'c> {
    ckpt: &'c Checkpoint,
    param: &'c Param,
    importance: Option<mixq_quantizer::kernels::importance::Importance>,
    fractions: Option<Vec<f64>>,
    method: QuantMethod,
}

impl<'c> UnitQuantizer<'c> {
    /// Prepares `param`'s quantization (reads its importance from `calib`).
    pub(crate) fn new(ckpt: &'c Checkpoint, param: &'c Param, calib: Option<&CalibrationUse>, method: QuantMethod) -> Result<Self, ValidateError> {
        let importance = match calib {
            Some(c) => c.importance(param)?,
            None => None,
        };
        let config = ckpt.config();
        let fractions = param.class.is_expert().then(|| expert_fractions(param, calib, config.num_local_experts, config.num_experts_per_tok));
        Ok(UnitQuantizer { ckpt, param, importance, fractions, method })
    }

    /// The unit in `format` (affine or mxfp4).
    pub(crate) fn quantize(&self, format: QuantFormat) -> Result<QuantizedUnit, ValidateError> {
        let rows_per_expert = if self.param.class.is_expert() { self.param.shape[1] } else { 1 };
        let row_weight = |r: usize| self.fractions.as_ref().map_or(1.0, |f| f[r / rows_per_expert]);
        Ok(quantize_unit(self.ckpt, self.param, format, self.method, self.importance.as_ref(), &row_weight)?)
    }
}

/// The runtime's view of a quantized unit's bytes.
pub(crate) fn unit_codes(q: &QuantizedUnit) -> Codes<'_> {
    match q.format {
        QuantFormat::Affine { bits, group_size } => Codes::Affine {
            weight: &q.weight,
            scales: &q.scales,
            biases: &q.biases,
            floats: FloatDtype::BF16,
            bits,
            group_size: group_size as usize,
        },
        _ => Codes::Mxfp4 { blocks: &q.weight, scales: &q.scales },
    }
}

/// The fraction of tokens routed to each of an expert parameter's `e` experts, from the
/// calibration's counts (uniform `k / e` without them): how much each expert's rows count.
fn expert_fractions(p: &Param, calib: Option<&CalibrationUse>, e: usize, k: usize) -> Vec<f64> {
    let counts = calib.and_then(|c| c.stats.expert_tokens(p.layer.unwrap_or(0)).map(|x| x.to_vec()));
    let tokens = calib.map_or(0, |c| c.stats.tokens) as f64;
    match counts {
        Some(c) if tokens > 0.0 => c.iter().map(|&x| f64::from(x) / tokens).collect(),
        _ => vec![k as f64 / e as f64; e],
    }
}

/// Carries a unit's measured KL at the reference setting to every setting through KL ∝
/// proxy^exponent, the exponent fitted from the second measured setting where there is one.
fn carry_measured_kl(u: &mut UnitCost, measured: &[((u32, u32), f64)], opts: &SensitivityOptions) {
    let proxy_at = |u: &UnitCost, s: (u32, u32)| u.setting(s).map_or(0.0, |x| x.proxy);
    let kl_at = |s: (u32, u32)| measured.iter().find(|m| m.0 == s).map(|m| m.1);
    let Some(kl) = kl_at(opts.reference) else { return };
    let p1 = proxy_at(u, opts.reference);
    let second = opts.second.and_then(|s| kl_at(s).map(|k| (s, k)));
    let exponent = second
        .and_then(|(s, k2)| {
            let p2 = proxy_at(u, s);
            let e = (k2 / kl).ln() / (p2 / p1).ln();
            e.is_finite().then(|| e.clamp(0.2, 1.5))
        })
        .unwrap_or(DEFAULT_EXPONENT);
    for s in &mut u.settings {
        s.cost = match (p1 > 0.0, s.proxy > 0.0) {
            (true, true) => kl * (s.proxy / p1).powf(exponent),
            // No weight error (upstream experts kept in mxfp4): nothing changes, nothing lost.
            (true, false) => 0.0,
            (false, _) => kl,
        };
    }
    u.measured_kl = Some(kl);
    u.second_kl = second.map(|((b, g), k)| (b, g, k));
    u.exponent = Some(exponent);
}

/// Deterministic heavy-tailed rows (a Gaussian scaled by a random per-row factor and an
/// occasional outlier), the stand-in weights of a synthetic run.
fn synthetic_rows(cols: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut u = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        ((s >> 40) as f64 + 0.5) / (1u64 << 24) as f64
    };
    let mut out = Vec::with_capacity(SYNTHETIC_ROWS * cols);
    for _ in 0..SYNTHETIC_ROWS {
        let scale = 0.01 + 0.03 * u();
        for _ in 0..cols {
            let g = (-2.0 * u().ln()).sqrt() * (std::f64::consts::TAU * u()).cos();
            let tail = if u() < 0.01 { 6.0 } else { 1.0 };
            out.push(half::bf16::from_f64(g * scale * tail).to_f32());
        }
    }
    out
}

/// The relative squared error of synthetic rows encoded as MXFP4 (rows that cannot be encoded
/// count as lost).
fn synthetic_mxfp4_error(rows: &[f32], cols: usize) -> f64 {
    use mixq_loader::format::MXFP4_BLOCK;
    let (mut blocks, mut scales, mut back) = (vec![0u8; cols / 2], vec![0u8; cols / MXFP4_BLOCK], vec![0f32; cols]);
    let (mut err, mut sig) = (0.0f64, 0.0f64);
    for row in rows.chunks_exact(cols) {
        let energy: f64 = row.iter().map(|&w| f64::from(w).powi(2)).sum();
        sig += energy;
        match mixq_quantizer::kernels::mxfp4::encode_row(row, FloatDtype::BF16, &mut blocks, &mut scales) {
            Ok(()) => {
                mixq_loader::decode::mxfp4_row_to_f32(&blocks, &scales, &mut back);
                err += row.iter().zip(&back).map(|(&w, &q)| f64::from(q - w).powi(2)).sum::<f64>();
            }
            Err(_) => err += energy,
        }
    }
    if sig > 0.0 { err / sig } else { 0.0 }
}

fn synthetic(
    config: &GptOssConfig,
    model_label: &str,
    opts: &SensitivityOptions,
    progress: &(dyn Fn(usize, usize) + Sync),
    start: std::time::Instant,
) -> Result<Sensitivity, ValidateError> {
    use mixq_quantizer::kernels::affine::packed_row_bytes;
    use mixq_quantizer::kernels::param_error::quantize_measured;
    let (e, k) = (config.num_local_experts as f64, config.num_experts_per_tok as f64);
    let params = units(config);
    let mut out = Vec::with_capacity(params.len());
    let (mut quantized, mut quantize_seconds) = (0usize, 0f64);
    for (n, p) in params.iter().enumerate() {
        let cols = p.in_features();
        let rows = synthetic_rows(cols, n as u64 + 1);
        let timer = std::time::Instant::now();
        let usage = if p.class.is_expert() { k / e } else { 1.0 };
        let settings: Vec<SettingCost> = settings_of(p, opts)
            .into_par_iter()
            .map(|format| {
                let QuantFormat::Affine { bits, group_size: gs } = format else {
                    // An upstream checkpoint's experts are MXFP4 and pass through exactly; a dense
                    // one's are encoded.
                    let upstream = config.quant_method.as_deref() == Some("mxfp4");
                    let proxy = if upstream { 0.0 } else { synthetic_mxfp4_error(&rows, cols) * usage };
                    return setting_cost(p, format, proxy, None);
                };
                let (mut err, mut sig) = (0.0f64, 0.0f64);
                let (mut packed, mut back) = (vec![0u8; packed_row_bytes(cols, bits)], vec![0f32; cols]);
                let groups = cols / gs as usize;
                let (mut sc, mut bi) = (vec![half::bf16::ZERO; groups], vec![half::bf16::ZERO; groups]);
                for row in rows.chunks_exact(cols) {
                    let measured =
                        quantize_measured(row, None, bits, gs as usize, opts.quantizer, &mut packed, &mut sc, &mut bi, &mut back);
                    if let Ok((e, s)) = measured {
                        err += e;
                        sig += s;
                    }
                }
                // The relative error of the sample, counted by how often the unit is used.
                let proxy = if sig > 0.0 { err / sig * usage } else { 0.0 };
                setting_cost(p, format, proxy, None)
            })
            .collect();
        quantize_seconds += timer.elapsed().as_secs_f64();
        quantized += rows.len() * settings.len();
        out.push(UnitCost::new(p, settings));
        progress(n + 1, params.len());
    }
    let settings = out.first().map_or(0, |u| u.settings.len());
    let real_run = cheap_run_cost(
        config,
        settings,
        opts.second.is_some(),
        opts.probe_tokens,
        quantize_seconds / quantized.max(1) as f64,
        measured_flops(),
    );
    Ok(Sensitivity {
        format: SENSITIVITY_FORMAT.into(),
        model: model_label.into(),
        config_sha256: ModelFingerprint::architecture_sha256(config),
        text_sha256: None,
        tokens: 0,
        calibration_sha256: None,
        quantizer: opts.quantizer.as_str().into(),
        reference_setting: opts.reference,
        second_setting: None,
        cost_kind: "proxy (synthetic weights)".into(),
        rank_correlation: None,
        proxy_rank_correlation: None,
        probe_tokens: 0,
        real_run: Some(real_run),
        seconds: start.elapsed().as_secs_f64(),
        units: out,
    })
}

/// Checks that group sizes are MLX's and bits are supported.
pub fn check_settings(bits: &[u32], group_sizes: &[u32]) -> Result<(), ValidateError> {
    use mixq_quantizer::kernels::affine::AFFINE_BITS;
    if let Some(b) = bits.iter().find(|b| !AFFINE_BITS.contains(b)) {
        return Err(ValidateError::Input(format!("--bits {b} is not supported; expected some of {AFFINE_BITS:?}")));
    }
    if let Some(g) = group_sizes.iter().find(|g| !AFFINE_GROUP_SIZES.contains(g)) {
        return Err(ValidateError::Input(format!("--group-sizes {g} is not supported; expected some of {AFFINE_GROUP_SIZES:?}")));
    }
    if bits.is_empty() || group_sizes.is_empty() {
        return Err(ValidateError::Input("--bits and --group-sizes need at least one value each".into()));
    }
    Ok(())
}

/// Units sorted by sensitivity (cost at the reference setting, most sensitive first).
pub fn ranked(s: &Sensitivity) -> Vec<&UnitCost> {
    let at_ref = |u: &UnitCost| u.setting(s.reference_setting).map_or(0.0, |x| x.cost);
    let mut v: Vec<&UnitCost> = s.units.iter().collect();
    v.sort_by(|a, b| at_ref(b).total_cmp(&at_ref(a)).then(a.module.cmp(&b.module)));
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::estimate::SiteResponse;

    #[test]
    fn an_anchor_carries_its_kl_along_the_line_through_its_two_points() {
        // KL 0.02 at entry error 4, 0.01 at 1: KL ∝ error^0.5.
        let two = Anchor { points: vec![(4.0, 0.02), (1.0, 0.01)] };
        assert!((two.cost(16.0, None).unwrap() - 0.04).abs() < 1e-12);
        assert!((two.cost(1.0, None).unwrap() - 0.01).abs() < 1e-12);
        assert_eq!(two.cost(0.0, None), Some(0.0), "no error, no cost");
        // One point: the site's noise exponent, else 1.
        let one = Anchor { points: vec![(4.0, 0.02)] };
        let site = SiteResponse { error: 1.0, kl: 1.0, exponent: 2.0 };
        assert!((one.cost(8.0, Some(site)).unwrap() - 0.08).abs() < 1e-12);
        assert!((one.cost(8.0, None).unwrap() - 0.04).abs() < 1e-12);
        // Nothing measured on the probe (or a unit that changes nothing there): no anchor.
        assert_eq!(Anchor::default().cost(1.0, None), None);
        assert_eq!(Anchor { points: vec![(0.0, 0.0)] }.cost(1.0, None), None);
    }
}
