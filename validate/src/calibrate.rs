//! `mixq calibrate`: runs a model over calibration text and records, for every linear input a
//! recipe can quantize, the per-input-channel mean of x² (for experts: per expert, over the
//! tokens routed to it, with each expert's token count), and with `--hessian` the mean of x xᵀ per
//! input site (with `--expert-hessians` also per expert at the routed sites).
//!
//! Windows of `ctx` tokens run in parallel on the CPU runtime; each accumulates f32 sums of x² of
//! its own, merged into f64 totals when the window ends, so memory is one set of sums per running
//! window. Hessians are accumulated as each layer's rows are seen: the rows' Gram matrix in f32
//! (one matrix multiply), added to the run's f64 upper triangle under that site's lock, so memory
//! is one f64 triangle per site (and expert) plus one f32 Gram per running window.
//!
//! On the GPU the windows run one after another; kernels add every sum (x² and the Gram
//! matrices) in f32 into one device buffer, read back once when the window ends and merged into
//! the same f64 totals.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Mutex;

use mixq_loader::calibration::{packed_len, HessianEntry, EXPERT_HESSIAN, HESSIAN, INPUT_SQ_MEAN, TOKEN_COUNT};
use mixq_loader::schema::Schema;
use mixq_loader::{Calibration, Checkpoint, GptOssConfig, InputSite, ModelFingerprint, StatTensor};
use mixq_runtime::gpu::{ObserveOptions, WindowStats};
use mixq_runtime::{ActivationObserver, Engine};
use rayon::prelude::*;

use crate::corpus::Corpus;
use crate::validate_job::Loader;
use crate::ValidateError;

/// Fewest tokens `calibrate` accepts.
pub const MIN_CALIBRATION_TOKENS: usize = 128;

/// Which input second-moment matrices a calibration run accumulates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HessianScope {
    /// None: per-channel means only (what `mse` uses).
    #[default]
    None,
    /// One per input site shared by its layers: q/k/v, o_proj, the router and the experts'
    /// gate/up (all tokens), lm_head. The experts' down inputs (each expert's own space) get none.
    Shared,
    /// Also one per expert at the gate/up and down inputs, over the tokens routed to it.
    PerExpert,
}

/// Settings of a calibration run.
#[derive(Debug, Clone, Copy)]
pub struct CalibrateOptions {
    /// Window length in tokens.
    pub ctx: usize,
    /// Use at most this many tokens of the text.
    pub max_tokens: Option<usize>,
    /// Which Hessians to accumulate.
    pub hessians: HessianScope,
    /// Report a hub download of the model on stderr.
    pub show_downloads: bool,
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

/// Running sums of x² of one window (f32) or of the whole run (f64).
#[derive(Default)]
struct Sums<T> {
    /// Site → (Σx² per channel, rows) over every token.
    tokens: HashMap<InputSite, (Vec<T>, u64)>,
    /// Routed site → (Σx² per expert and channel, rows per expert).
    routed: HashMap<InputSite, (Vec<T>, Vec<u64>)>,
}

/// One site's f64 sum of x xᵀ (packed upper triangle) and its row count, behind one lock.
type LockedSum = Mutex<(Vec<f64>, u64)>;

/// A run's f64 sums of x xᵀ (packed upper triangles) with their row counts, one lock each.
struct HessianSums {
    /// Site → Σ x xᵀ over every token's row (all sites but the experts' down input).
    shared: HashMap<InputSite, LockedSum>,
    /// Routed site → per expert Σ x xᵀ over the rows routed to it.
    experts: HashMap<InputSite, Vec<LockedSum>>,
}

impl HessianSums {
    fn new(c: &GptOssConfig, scope: HessianScope) -> Self {
        let mut shared = HashMap::new();
        let mut experts = HashMap::new();
        if scope != HessianScope::None {
            for site in InputSite::all(c) {
                let n = packed_len(site.width(c));
                // Every expert's down input is its own space: there is no shared down Hessian.
                if !matches!(site, InputSite::ExpertDown(_)) {
                    shared.insert(site, Mutex::new((vec![0.0; n], 0)));
                }
                if scope == HessianScope::PerExpert && site.is_routed() {
                    experts.insert(site, (0..c.num_local_experts).map(|_| Mutex::new((vec![0.0; n], 0))).collect());
                }
            }
        }
        HessianSums { shared, experts }
    }

    /// Adds a full `width × width` Gram matrix of `m` rows to `acc`'s upper triangle.
    fn add_gram(acc: &LockedSum, gram: &[f32], width: usize, m: u64) {
        let mut guard = acc.lock().unwrap_or_else(|e| e.into_inner());
        let (sum, n) = &mut *guard;
        let mut k = 0;
        for i in 0..width {
            for &g in &gram[i * width + i..(i + 1) * width] {
                sum[k] += f64::from(g);
                k += 1;
            }
        }
        *n += m;
    }

    /// Adds the Gram matrix of `rows` (`[m, width]`) to `acc`.
    fn add(acc: &LockedSum, rows: &[f32], width: usize) {
        let m = rows.len() / width;
        if m == 0 {
            return;
        }
        let mut gram = vec![0f32; width * width];
        assert!(rows.len() == m * width);
        // SAFETY: Xᵀ (width x m, strides 1 and width) and X (m x width, strides width and 1) lie
        // inside `rows`, and the product (width x width, row-major) inside `gram`.
        unsafe {
            matrixmultiply::sgemm(
                width, m, width, 1.0,
                rows.as_ptr(), 1, width as isize,
                rows.as_ptr(), width as isize, 1,
                0.0,
                gram.as_mut_ptr(), width as isize, 1,
            );
        }
        Self::add_gram(acc, &gram, width, m as u64);
    }

    /// Adds a GPU window's Gram sums: every token's at the shared sites, each expert's rows'
    /// (counted in `routed`) at the routed ones.
    fn add_window(&self, w: &WindowStats, width_of: impl Fn(InputSite) -> usize) {
        for (site, gram) in &w.hessians {
            if let Some(acc) = self.shared.get(site) {
                Self::add_gram(acc, gram, width_of(*site), w.tokens);
            }
        }
        for (site, grams) in &w.expert_hessians {
            let (Some(accs), Some((_, _, counts))) = (self.experts.get(site), w.routed_squares.iter().find(|r| r.0 == *site)) else {
                continue;
            };
            let width = width_of(*site);
            for ((acc, gram), &m) in accs.iter().zip(grams.chunks_exact(width * width)).zip(counts) {
                Self::add_gram(acc, gram, width, m);
            }
        }
    }

    /// The mean Hessians as statistics entries, named by site.
    fn into_entries(self) -> BTreeMap<String, HessianEntry> {
        let mean = |(sum, n): (Vec<f64>, u64)| -> Vec<f32> { sum.iter().map(|&s| if n > 0 { (s / n as f64) as f32 } else { 0.0 }).collect() };
        let mut out = BTreeMap::new();
        for (site, acc) in self.shared {
            let data = mean(acc.into_inner().unwrap_or_else(|e| e.into_inner()));
            out.insert(format!("{}.{HESSIAN}", site.name()), HessianEntry::Loaded(StatTensor { shape: vec![data.len()], data }));
        }
        for (site, per_expert) in self.experts {
            let e = per_expert.len();
            let data: Vec<f32> = per_expert.into_iter().flat_map(|acc| mean(acc.into_inner().unwrap_or_else(|e| e.into_inner()))).collect();
            let shape = vec![e, data.len() / e.max(1)];
            out.insert(format!("{}.{EXPERT_HESSIAN}", site.name()), HessianEntry::Loaded(StatTensor { shape, data }));
        }
        out
    }
}

/// Observer of one window: its own x² sums, and the run's Hessian sums.
struct WindowSums<'c> {
    config: &'c GptOssConfig,
    sums: Sums<f32>,
    hessians: &'c HessianSums,
}

fn add_squares(acc: &mut [f32], rows: &[f32]) {
    for row in rows.chunks_exact(acc.len()) {
        for (a, &x) in acc.iter_mut().zip(row) {
            *a += x * x;
        }
    }
}

impl ActivationObserver for WindowSums<'_> {
    fn tokens(&mut self, site: InputSite, rows: &[f32]) {
        let width = site.width(self.config);
        let (acc, n) = self.sums.tokens.entry(site).or_insert_with(|| (vec![0.0; width], 0));
        add_squares(acc, rows);
        *n += (rows.len() / width) as u64;
        // The mlp input's shared Hessian is over every token: the router's input, and for gate/up
        // the same matrix the routed rows sum to (each token counted top-k times).
        if let Some(acc) = self.hessians.shared.get(&site) {
            HessianSums::add(acc, rows, width);
        }
    }

    fn routed(&mut self, site: InputSite, expert: usize, rows: &[f32]) {
        let c = self.config;
        let width = site.width(c);
        let (acc, counts) = self
            .sums
            .routed
            .entry(site)
            .or_insert_with(|| (vec![0.0; c.num_local_experts * width], vec![0; c.num_local_experts]));
        add_squares(&mut acc[expert * width..(expert + 1) * width], rows);
        counts[expert] += (rows.len() / width) as u64;
        if let Some(acc) = self.hessians.experts.get(&site).and_then(|v| v.get(expert)) {
            HessianSums::add(acc, rows, width);
        }
    }
}

impl Sums<f32> {
    /// A GPU window's x² sums, as the CPU observer would have gathered them.
    fn of_window(w: &WindowStats) -> Self {
        Sums {
            tokens: w.squares.iter().map(|(site, v)| (*site, (v.clone(), w.tokens))).collect(),
            routed: w.routed_squares.iter().map(|(site, v, counts)| (*site, (v.clone(), counts.clone()))).collect(),
        }
    }
}

impl Sums<f64> {
    fn merge(&mut self, w: Sums<f32>) {
        for (k, (v, n)) in w.tokens {
            let (acc, total) = self.tokens.entry(k).or_insert_with(|| (vec![0.0; v.len()], 0));
            acc.iter_mut().zip(&v).for_each(|(a, &x)| *a += f64::from(x));
            *total += n;
        }
        for (k, (v, counts)) in w.routed {
            let (acc, total) = self.routed.entry(k).or_insert_with(|| (vec![0.0; v.len()], vec![0; counts.len()]));
            acc.iter_mut().zip(&v).for_each(|(a, &x)| *a += f64::from(x));
            total.iter_mut().zip(&counts).for_each(|(a, &x)| *a += x);
        }
    }

    /// The per-channel statistics, named by the MLX modules of the schema that read each site.
    fn into_tensors(self, c: &GptOssConfig) -> BTreeMap<String, StatTensor> {
        let mut out = BTreeMap::new();
        let mean = |sums: &[f64], n: u64| -> Vec<f32> { sums.iter().map(|&s| if n > 0 { (s / n as f64) as f32 } else { 0.0 }).collect() };
        let schema = Schema::new(c);
        for p in schema.params().iter().filter(|p| p.is_quantizable()) {
            let Some(site) = p.input_site() else { continue };
            let name = format!("{}.{INPUT_SQ_MEAN}", p.module);
            if p.class.is_expert() {
                let Some((sums, counts)) = self.routed.get(&site) else { continue };
                let width = site.width(c);
                let data: Vec<f32> = sums.chunks_exact(width).zip(counts).flat_map(|(s, &n)| mean(s, n)).collect();
                out.insert(name, StatTensor { shape: vec![counts.len(), width], data });
            } else if let Some((sums, n)) = self.tokens.get(&site) {
                out.insert(name, StatTensor { shape: vec![sums.len()], data: mean(sums, *n) });
            }
        }
        for (site, (_, counts)) in &self.routed {
            if let (InputSite::Mlp(layer), e) = (site, counts.len()) {
                let data = counts.iter().map(|&n| n as f32).collect();
                out.insert(format!("model.layers.{layer}.mlp.experts.{TOKEN_COUNT}"), StatTensor { shape: vec![e], data });
            }
        }
        out
    }
}

/// Runs `model` over `tokens` in windows of `opts.ctx` and returns the statistics;
/// `progress(tokens_done, tokens_total)` is called as windows finish. On the CPU the windows run
/// in parallel; on the GPU one after another, each window's sums read back once.
pub fn calibrate_tokens(
    model: &Engine<'_>,
    tokens: &[u32],
    ctx: usize,
    hessians: HessianScope,
    progress: &(dyn Fn(usize, usize) + Sync),
) -> Result<(Statistics, usize), ValidateError> {
    let c = model.config();
    let totals = Mutex::new(Sums::<f64>::default());
    let hessian_sums = HessianSums::new(c, hessians);
    let done = std::sync::atomic::AtomicUsize::new(0);
    let windows: Vec<&[u32]> = tokens.chunks(ctx).collect();
    let finished = |w: &[u32], sums: Sums<f32>| {
        totals.lock().unwrap_or_else(|e| e.into_inner()).merge(sums);
        let n = done.fetch_add(w.len(), std::sync::atomic::Ordering::Relaxed) + w.len();
        progress(n, tokens.len());
    };
    match model {
        Engine::Cpu(m) => windows.par_iter().try_for_each(|w| -> Result<(), ValidateError> {
            let mut sums = WindowSums { config: c, sums: Sums::default(), hessians: &hessian_sums };
            m.forward_observed(w, &mut m.new_cache(), false, Some(&mut sums))?;
            finished(w, sums.sums);
            Ok(())
        })?,
        Engine::Gpu { model: gpu, .. } => {
            let opts = ObserveOptions { hessians: hessians != HessianScope::None, expert_hessians: hessians == HessianScope::PerExpert };
            let mut session = gpu.observing_session(ctx, opts)?;
            for w in &windows {
                let stats = session.observe(w)?;
                hessian_sums.add_window(&stats, |site| site.width(c));
                finished(w, Sums::of_window(&stats));
            }
        }
    }
    let totals = totals.into_inner().unwrap_or_else(|e| e.into_inner());
    Ok((Statistics { tensors: totals.into_tensors(c), hessians: hessian_sums.into_entries() }, windows.len()))
}

/// What a run measured: per-channel statistics and Hessians, named as the file stores them.
pub struct Statistics {
    /// Per-channel means and token counts.
    pub tensors: BTreeMap<String, StatTensor>,
    /// Mean Hessians (empty unless asked for).
    pub hessians: BTreeMap<String, HessianEntry>,
}

/// Calibrates the model in `model_dir` (upstream, transformers dense, or converted) on the text
/// file `text`, on the backend `load` opens it on.
pub fn calibrate(
    model_dir: &Path,
    load: &Loader<'_, ValidateError>,
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
    let model = load(&ckpt)?;
    let ctx = opts.ctx.min(model.max_context());
    let start = std::time::Instant::now();
    let (Statistics { tensors, hessians }, windows) = calibrate_tokens(&model, &tokens, ctx, opts.hessians, progress)?;
    let seconds = start.elapsed().as_secs_f64();
    let stats = Calibration {
        model: fingerprint,
        model_label: model_label.to_string(),
        text_sha256,
        tokens: tokens.len() as u64,
        ctx,
        tensors,
        hessians,
        file: None,
    };
    Ok(CalibrationRun { stats, windows, seconds })
}
