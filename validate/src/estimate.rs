//! The cheap cost of quantizing one unit, from a probe the model writes itself, without a text.
//!
//! A unit's quantization error enters the residual stream at one site: the embeddings, the
//! output of its layer's attention block (q/k/v/o) or of its MLP block (router, experts), or the
//! logits (lm_head). The probe windows are run through the source once, keeping the residual
//! stream at every site and the logits. Then, per unit:
//! 1. **Its error where it enters**, at every setting: the block is re-run alone, with only this
//!    unit quantized, on the stored stream, and the mean squared difference of its output per
//!    token is taken (exact: through the attention softmax, the router's choices and SwiGLU, not
//!    a linearisation). For the embeddings it is the rows' difference; for lm_head the KL
//!    itself, which only needs the last matrix.
//! 2. **Its KL on the probe** at the measured settings (the reference and the second): the
//!    changed block's output runs through the rest of the model (the stream before the site is
//!    the source's, so nothing before it runs again) and the KL to the source's logits is taken.
//!    Every other setting's cost is that KL scaled by (its entry error / the measured one's)^e,
//!    e from the two measured settings.
//!
//! One perturbation run per site (two with a second setting) adds Gaussian noise shaped like the
//! site's quantization errors and measures the KL it causes; its exponent in KL ∝ error^e stands
//! in where a unit has only one measured setting. Nothing is fitted across units or models:
//! every figure comes from the unit's or the site's own runs.

use mixq_runtime::residual::{ResidualSite, ResidualTrace};
use mixq_runtime::{Model, Sampler, SamplerConfig};
use rayon::prelude::*;

use mixq_loader::schema::{Param, TensorClass};

use crate::eval::compare_full;
use crate::ValidateError;

/// Where a unit's error enters the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    /// The embeddings: the residual stream's first site.
    Embeddings,
    /// The block reading this site writes the unit's output into the next one.
    Block(ResidualSite),
    /// The logits (lm_head).
    Head,
}

impl Entry {
    /// Where `p`'s quantization error enters.
    pub fn of(p: &Param) -> Result<Self, ValidateError> {
        let layer = || p.layer.ok_or_else(|| ValidateError::Input(format!("{}: a layer weight without a layer", p.module)));
        Ok(match p.class {
            TensorClass::EmbedTokens => Entry::Embeddings,
            TensorClass::LmHead => Entry::Head,
            TensorClass::QProj | TensorClass::KProj | TensorClass::VProj | TensorClass::OProj => Entry::Block(2 * layer()?),
            TensorClass::Router | TensorClass::ExpertsGate | TensorClass::ExpertsUp | TensorClass::ExpertsDown => {
                Entry::Block(2 * layer()? + 1)
            }
            TensorClass::Norm | TensorClass::Bias | TensorClass::Sinks => {
                return Err(ValidateError::Input(format!("{}: not a quantizable unit", p.module)))
            }
        })
    }

    /// The residual site the error lands on (`None` for the logits).
    pub fn site(self) -> Option<ResidualSite> {
        match self {
            Entry::Embeddings => Some(0),
            Entry::Block(s) => Some(s + 1),
            Entry::Head => None,
        }
    }
}

/// A unit's error where it enters: mean squared difference per token, and per dimension.
#[derive(Debug, Clone)]
pub struct EntryError {
    /// Mean over tokens of the squared norm of the difference.
    pub per_token: f64,
    /// Mean over tokens of each dimension's squared difference (`hidden` values).
    pub per_dim: Vec<f64>,
    /// Where asked for: the mean KL(source ‖ changed) over the probe, the changed stream run
    /// through the rest of the model.
    pub kl: Option<f64>,
}

/// Probe windows run through the source model once, with the residual stream kept at every
/// site and the logits they end in.
pub struct Probe<'m, 'a> {
    model: &'m Model<'a>,
    traces: Vec<ResidualTrace>,
    logits: Vec<Vec<f32>>,
}

/// Probe windows the model writes itself: `windows` streams of `ctx` tokens sampled at
/// temperature 1 from token 0, each from its own seed. They need no text, and no text the
/// estimate is later checked on can have been seen by it.
pub fn generated_windows(model: &Model<'_>, windows: usize, ctx: usize) -> Result<Vec<Vec<u32>>, ValidateError> {
    (0..windows)
        .into_par_iter()
        .map(|w| {
            let mut sampler = Sampler::new(SamplerConfig { temperature: 1.0, top_p: 1.0, top_k: 0, seed: 0x5EED + w as u64 });
            let (mut out, _) = mixq_runtime::generate(model, &[0], ctx.saturating_sub(1), &mut sampler, &[], |_| {})?;
            out.insert(0, 0);
            Ok(out)
        })
        .collect()
}

impl<'m, 'a> Probe<'m, 'a> {
    /// Runs the windows through `model`, keeping what the estimates need.
    pub fn new(model: &'m Model<'a>, windows: &[Vec<u32>]) -> Result<Self, ValidateError> {
        let traces: Vec<ResidualTrace> = windows.par_iter().map(|w| model.residual_trace(w)).collect::<Result<_, _>>()?;
        let last = model.residual_sites() - 1;
        let logits = traces.par_iter().map(|t| model.logits_from(last, &t.sites[last])).collect();
        Ok(Probe { model, traces, logits })
    }

    /// Tokens in the probe.
    pub fn tokens(&self) -> usize {
        self.traces.iter().map(|t| t.tokens.len()).sum()
    }

    /// The error `changed` (the source with one unit replaced) makes where the unit enters and,
    /// with `with_kl`, the KL it causes: the changed stream runs through the rest of the model
    /// (the stream before the entry is the source's, so nothing before it runs again).
    pub fn entry_error(&self, changed: &Model<'_>, entry: Entry, with_kl: bool) -> Result<EntryError, ValidateError> {
        let h = self.model.config.hidden_size;
        let vocab = self.model.config.vocab_size;
        let parts: Vec<(Vec<f64>, f64)> = self
            .traces
            .par_iter()
            .zip(&self.logits)
            .map(|(t, r)| -> Result<(Vec<f64>, f64), ValidateError> {
                let (out, site) = match entry {
                    Entry::Embeddings => (changed.embed_rows(&t.tokens)?, 0),
                    Entry::Block(s) => (changed.run_block(s, &t.sites[s]), s + 1),
                    Entry::Head => return Err(ValidateError::Input("lm_head's error is its KL, not a residual error".into())),
                };
                let mut per_dim = vec![0f64; h];
                for (a, b) in out.chunks_exact(h).zip(t.sites[site].chunks_exact(h)) {
                    for ((d, x), y) in per_dim.iter_mut().zip(a).zip(b) {
                        *d += f64::from(x - y).powi(2);
                    }
                }
                let kl = if with_kl { kl_sum(&self.model.logits_from(site, &out), r, vocab) } else { 0.0 };
                Ok((per_dim, kl))
            })
            .collect::<Result<_, _>>()?;
        let n = self.tokens().max(1) as f64;
        let per_dim: Vec<f64> = (0..h).map(|d| parts.iter().map(|p| p.0[d]).sum::<f64>() / n).collect();
        // Summed in window order, so that the estimate does not depend on the thread count.
        let kl = with_kl.then(|| parts.iter().map(|p| p.1).sum::<f64>() / n);
        Ok(EntryError { per_token: per_dim.iter().sum(), per_dim, kl })
    }

    /// Mean KL(source ‖ changed) over the probe when only lm_head differs.
    pub fn head_kl(&self, changed: &Model<'_>) -> f64 {
        let last = self.model.residual_sites() - 1;
        let vocab = self.model.config.vocab_size;
        // Summed in window order, so that the estimate does not depend on the thread count.
        let sum: f64 = self
            .traces
            .par_iter()
            .zip(&self.logits)
            .map(|(t, r)| kl_sum(&changed.logits_from(last, &t.sites[last]), r, vocab))
            .collect::<Vec<f64>>()
            .iter()
            .sum();
        sum / self.tokens().max(1) as f64
    }

    /// Mean KL(source ‖ source with Gaussian noise of per-dimension variance `variance` added to
    /// the residual stream at `site`); the noise is the same for the same `seed`.
    pub fn noise_kl(&self, site: ResidualSite, variance: &[f64], seed: u64) -> f64 {
        let vocab = self.model.config.vocab_size;
        let h = self.model.config.hidden_size;
        let sd: Vec<f32> = variance.iter().map(|v| v.max(0.0).sqrt() as f32).collect();
        let sum: f64 = self
            .traces
            .par_iter()
            .zip(&self.logits)
            .enumerate()
            .map(|(w, (t, r))| {
                let mut gauss = Gaussian::new(seed ^ (w as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
                let mut x = t.sites[site].clone();
                for row in x.chunks_exact_mut(h) {
                    for (v, s) in row.iter_mut().zip(&sd) {
                        *v += s * gauss.next() as f32;
                    }
                }
                kl_sum(&self.model.logits_from(site, &x), r, vocab)
            })
            .collect::<Vec<f64>>()
            .iter()
            .sum();
        sum / self.tokens().max(1) as f64
    }
}

/// Σ over positions of KL(reference row ‖ model row).
fn kl_sum(model: &[f32], reference: &[f32], vocab: usize) -> f64 {
    model.chunks_exact(vocab).zip(reference.chunks_exact(vocab)).map(|(m, r)| compare_full(m, r, 0).kl).sum()
}

/// Standard normal samples from a xorshift generator (Box-Muller), deterministic per seed.
struct Gaussian {
    state: u64,
    spare: Option<f64>,
}

impl Gaussian {
    fn new(seed: u64) -> Self {
        Gaussian { state: seed | 1, spare: None }
    }

    fn uniform(&mut self) -> f64 {
        self.state ^= self.state << 13;
        self.state ^= self.state >> 7;
        self.state ^= self.state << 17;
        ((self.state >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    fn next(&mut self) -> f64 {
        if let Some(s) = self.spare.take() {
            return s;
        }
        let (r, t) = ((-2.0 * self.uniform().ln()).sqrt(), std::f64::consts::TAU * self.uniform());
        self.spare = Some(r * t.sin());
        r * t.cos()
    }
}

/// The units' entry errors summed per residual site at the reference and the second setting: the
/// shape and size of the noise each site's response is measured with.
pub struct SiteErrors {
    /// Per site: per-dimension sums at the reference setting, at the second, and units counted.
    sites: Vec<(Vec<f64>, Vec<f64>, usize)>,
}

impl SiteErrors {
    /// Nothing added yet, for a model with `sites` residual sites.
    pub fn new(sites: usize) -> Self {
        SiteErrors { sites: vec![(Vec::new(), Vec::new(), 0); sites] }
    }

    /// Adds one unit's error where it lands (nothing for the logits), at the reference setting
    /// or the second.
    pub fn add(&mut self, entry: Entry, err: &EntryError, reference: bool) {
        let Some(site) = entry.site() else { return };
        let acc = &mut self.sites[site];
        let sum = if reference { &mut acc.0 } else { &mut acc.1 };
        sum.resize(err.per_dim.len(), 0.0);
        sum.iter_mut().zip(&err.per_dim).for_each(|(a, b)| *a += b);
        acc.2 += usize::from(reference);
    }

    /// Each site's response to noise shaped as its units' mean error (`None` where no unit lands).
    pub fn responses(&self, probe: &Probe<'_, '_>) -> Vec<Option<SiteResponse>> {
        self.sites
            .par_iter()
            .enumerate()
            .map(|(site, (reference, second, count))| {
                (*count > 0).then(|| {
                    let mean = |v: &[f64]| v.iter().map(|x| x / *count as f64).collect::<Vec<f64>>();
                    let second = (!second.is_empty()).then(|| mean(second));
                    SiteResponse::measure(probe, site, &mean(reference), second.as_deref())
                })
            })
            .collect()
    }
}

/// How the rest of the model answers an error at one site: the KL of noise of a known size.
#[derive(Debug, Clone, Copy)]
pub struct SiteResponse {
    /// Squared norm per token of the noise of the reference setting.
    pub error: f64,
    /// The KL it caused.
    pub kl: f64,
    /// The exponent of KL ∝ error^e (from the second noise size; 1 without one).
    pub exponent: f64,
}

impl SiteResponse {
    /// Measures a site with noise shaped as `reference` (per-dimension variance) and, where given,
    /// a second size `second` fixing the exponent.
    pub fn measure(probe: &Probe<'_, '_>, site: ResidualSite, reference: &[f64], second: Option<&[f64]>) -> Self {
        let error: f64 = reference.iter().sum();
        let kl = probe.noise_kl(site, reference, 0xA5A5 + site as u64);
        let exponent = second
            .and_then(|v| {
                let (e2, k2) = (v.iter().sum::<f64>(), probe.noise_kl(site, v, 0xA5A5 + site as u64));
                let e = (k2 / kl).ln() / (e2 / error).ln();
                e.is_finite().then_some(e)
            })
            .unwrap_or(1.0);
        SiteResponse { error, kl, exponent }
    }

    /// The predicted KL of an error of squared norm `error` per token at this site.
    pub fn cost(&self, error: f64) -> f64 {
        if self.error > 0.0 && error > 0.0 {
            self.kl * (error / self.error).powf(self.exponent)
        } else {
            0.0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gaussian_has_unit_variance() {
        let mut g = Gaussian::new(7);
        let xs: Vec<f64> = (0..200_000).map(|_| g.next()).collect();
        let mean = xs.iter().sum::<f64>() / xs.len() as f64;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / xs.len() as f64;
        assert!(mean.abs() < 0.01 && (var - 1.0).abs() < 0.02, "mean {mean} var {var}");
    }

    #[test]
    fn site_cost_scales_by_the_exponent() {
        let r = SiteResponse { error: 2.0, kl: 0.1, exponent: 0.5 };
        assert!((r.cost(8.0) - 0.2).abs() < 1e-12);
        assert_eq!(r.cost(0.0), 0.0);
    }
}
