//! `mixq calibrate`: runs a model over calibration text and records, for every linear input a
//! recipe can quantize, the per-input-channel mean of x² (for experts: per expert, over the
//! tokens routed to it, with each expert's token count).
//!
//! Windows of `ctx` tokens run in parallel on the CPU runtime; each accumulates f32 sums of its
//! own, merged into f64 totals when the window ends, so memory is one set of sums per running
//! window.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;

use mixq_loader::calibration::{INPUT_SQ_MEAN, TOKEN_COUNT};
use mixq_loader::{Calibration, Checkpoint, GptOssConfig, ModelFingerprint, StatTensor};
use mixq_runtime::{ActivationObserver, DenseSite, ExpertSite, Model};
use rayon::prelude::*;

use crate::corpus::Corpus;
use crate::ValidateError;

/// Fewest tokens `calibrate` accepts.
pub const MIN_CALIBRATION_TOKENS: usize = 128;

/// Settings of a calibration run.
#[derive(Debug, Clone, Copy)]
pub struct CalibrateOptions {
    /// Window length in tokens.
    pub ctx: usize,
    /// Use at most this many tokens of the text.
    pub max_tokens: Option<usize>,
}

/// The statistics of a run and how long it took.
#[derive(Debug, Clone)]
pub struct CalibrationRun {
    /// The statistics, ready to write.
    pub stats: Calibration,
    /// Windows run.
    pub windows: usize,
    /// Seconds spent running the model.
    pub seconds: f64,
}

impl CalibrationRun {
    /// Tokens run per second.
    pub fn tokens_per_second(&self) -> f64 {
        self.stats.tokens as f64 / self.seconds.max(1e-9)
    }
}

/// Running sums of one window (f32) or of the whole run (f64).
#[derive(Default)]
struct Sums<T> {
    /// (layer, site) → (Σx² per channel, rows).
    dense: HashMap<(Option<usize>, DenseSite), (Vec<T>, u64)>,
    /// (layer, site) → (Σx² per expert and channel, rows per expert).
    experts: HashMap<(usize, ExpertSite), (Vec<T>, Vec<u64>)>,
}

/// Observer of one window, told the expert count so expert sums can be laid out.
struct WindowSums<'c> {
    config: &'c GptOssConfig,
    sums: Sums<f32>,
}

fn add_squares(acc: &mut [f32], rows: &[f32]) {
    for row in rows.chunks_exact(acc.len()) {
        for (a, &x) in acc.iter_mut().zip(row) {
            *a += x * x;
        }
    }
}

impl ActivationObserver for WindowSums<'_> {
    fn dense(&mut self, layer: Option<usize>, site: DenseSite, rows: &[f32]) {
        let width = match site {
            DenseSite::AttentionOut => self.config.num_attention_heads * self.config.head_dim,
            _ => self.config.hidden_size,
        };
        let (acc, n) = self.sums.dense.entry((layer, site)).or_insert_with(|| (vec![0.0; width], 0));
        add_squares(acc, rows);
        *n += (rows.len() / width) as u64;
    }

    fn expert(&mut self, layer: usize, site: ExpertSite, expert: usize, rows: &[f32]) {
        let c = self.config;
        let width = match site {
            ExpertSite::GateUp => c.hidden_size,
            ExpertSite::Down => c.intermediate_size,
        };
        let (acc, counts) = self
            .sums
            .experts
            .entry((layer, site))
            .or_insert_with(|| (vec![0.0; c.num_local_experts * width], vec![0; c.num_local_experts]));
        add_squares(&mut acc[expert * width..(expert + 1) * width], rows);
        counts[expert] += (rows.len() / width) as u64;
    }
}

impl Sums<f64> {
    fn merge(&mut self, w: Sums<f32>) {
        for (k, (v, n)) in w.dense {
            let (acc, total) = self.dense.entry(k).or_insert_with(|| (vec![0.0; v.len()], 0));
            acc.iter_mut().zip(&v).for_each(|(a, &x)| *a += f64::from(x));
            *total += n;
        }
        for (k, (v, counts)) in w.experts {
            let (acc, total) = self.experts.entry(k).or_insert_with(|| (vec![0.0; v.len()], vec![0; counts.len()]));
            acc.iter_mut().zip(&v).for_each(|(a, &x)| *a += f64::from(x));
            total.iter_mut().zip(&counts).for_each(|(a, &x)| *a += x);
        }
    }

    /// The statistics tensors, named by the MLX modules they weight.
    fn into_tensors(self, c: &GptOssConfig) -> std::collections::BTreeMap<String, StatTensor> {
        let mut out = std::collections::BTreeMap::new();
        let mean = |sums: &[f64], n: u64| -> Vec<f32> { sums.iter().map(|&s| if n > 0 { (s / n as f64) as f32 } else { 0.0 }).collect() };
        for ((layer, site), (sums, n)) in self.dense {
            let data = mean(&sums, n);
            let modules: Vec<String> = match (layer, site) {
                (None, _) => vec!["lm_head".into()],
                (Some(l), DenseSite::Qkv) => {
                    ["q_proj", "k_proj", "v_proj"].iter().map(|p| format!("model.layers.{l}.self_attn.{p}")).collect()
                }
                (Some(l), DenseSite::AttentionOut) => vec![format!("model.layers.{l}.self_attn.o_proj")],
                (Some(l), DenseSite::Router) => vec![format!("model.layers.{l}.mlp.router")],
                (Some(_), DenseSite::LmHead) => vec!["lm_head".into()],
            };
            for m in modules {
                out.insert(format!("{m}.{INPUT_SQ_MEAN}"), StatTensor { shape: vec![data.len()], data: data.clone() });
            }
        }
        let e = c.num_local_experts;
        for ((layer, site), (sums, counts)) in self.experts {
            let width = sums.len() / e;
            let data: Vec<f32> = sums.chunks_exact(width).zip(&counts).flat_map(|(s, &n)| mean(s, n)).collect();
            let prefix = format!("model.layers.{layer}.mlp.experts");
            let projections: &[&str] = match site {
                ExpertSite::GateUp => {
                    let counts = counts.iter().map(|&n| n as f32).collect();
                    out.insert(format!("{prefix}.{TOKEN_COUNT}"), StatTensor { shape: vec![e], data: counts });
                    &["gate_proj", "up_proj"]
                }
                ExpertSite::Down => &["down_proj"],
            };
            for p in projections {
                out.insert(format!("{prefix}.{p}.{INPUT_SQ_MEAN}"), StatTensor { shape: vec![e, width], data: data.clone() });
            }
        }
        out
    }
}

/// Runs `model` over `tokens` in windows of `opts.ctx` and returns the statistics;
/// `progress(tokens_done, tokens_total)` is called as windows finish.
pub fn calibrate_tokens(
    model: &Model<'_>,
    tokens: &[u32],
    ctx: usize,
    progress: &(dyn Fn(usize, usize) + Sync),
) -> Result<(std::collections::BTreeMap<String, StatTensor>, usize), ValidateError> {
    let c = &model.config;
    let totals = Mutex::new(Sums::<f64>::default());
    let done = std::sync::atomic::AtomicUsize::new(0);
    let windows: Vec<&[u32]> = tokens.chunks(ctx).collect();
    windows.par_iter().try_for_each(|w| -> Result<(), ValidateError> {
        let mut sums = WindowSums { config: c, sums: Sums::default() };
        model.forward_observed(w, &mut model.new_cache(), false, Some(&mut sums))?;
        totals.lock().unwrap_or_else(|e| e.into_inner()).merge(sums.sums);
        let n = done.fetch_add(w.len(), std::sync::atomic::Ordering::Relaxed) + w.len();
        progress(n, tokens.len());
        Ok(())
    })?;
    let totals = totals.into_inner().unwrap_or_else(|e| e.into_inner());
    Ok((totals.into_tensors(c), windows.len()))
}

/// Calibrates the model in `model_dir` (upstream or converted) on the text file `text`, on the CPU.
pub fn calibrate(
    model_dir: &Path,
    model_label: &str,
    text: &Path,
    opts: CalibrateOptions,
    progress: &(dyn Fn(usize, usize) + Sync),
) -> Result<CalibrationRun, ValidateError> {
    if opts.ctx < 2 {
        return Err(ValidateError::Input(format!("--ctx must be at least 2 (got {})", opts.ctx)));
    }
    let Corpus { tokens, sha256: text_sha256 } = Corpus::read(model_dir, text, opts.max_tokens)?;
    if tokens.len() < MIN_CALIBRATION_TOKENS {
        return Err(ValidateError::Input(format!(
            "{}: {} tokens{}; calibration needs at least {MIN_CALIBRATION_TOKENS}",
            text.display(),
            tokens.len(),
            if opts.max_tokens.is_some() { " (after --max-tokens)" } else { "" }
        )));
    }
    let ckpt = Checkpoint::open(model_dir)?;
    let fingerprint = ModelFingerprint::of(&ckpt)?;
    let model = Model::load(&ckpt)?;
    let ctx = opts.ctx.min(model.max_context());
    let start = std::time::Instant::now();
    let (tensors, windows) = calibrate_tokens(&model, &tokens, ctx, progress)?;
    let seconds = start.elapsed().as_secs_f64();
    let stats = Calibration {
        model: fingerprint,
        model_label: model_label.to_string(),
        text_sha256,
        tokens: tokens.len() as u64,
        ctx,
        tensors,
    };
    Ok(CalibrationRun { stats, windows, seconds })
}
