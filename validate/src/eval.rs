//! Running a model (and optionally its reference) over sliding windows and scoring every token.

use mixq_runtime::Engine;
use rayon::prelude::*;

use crate::reference::{log_sum_exp, RefToken};
use crate::windows::{windows, Window};
use crate::ValidateError;

/// Evaluation settings.
#[derive(Debug, Clone, Copy)]
pub struct EvalOptions {
    /// Window length in tokens.
    pub ctx: usize,
    /// Advance between windows.
    pub stride: usize,
    /// Logits kept per token in a saved reference.
    pub top_k: usize,
}

/// What the model under test is compared with.
pub enum Reference<'a> {
    /// Nothing: perplexity only.
    None,
    /// A reference model run on the same windows (exact KL over the whole vocabulary).
    Model(&'a Engine<'a>),
    /// Saved top-k reference logits (KL over the top k plus the remaining mass).
    Saved(&'a [RefToken]),
}

/// Per scored token figures.
#[derive(Debug, Clone, Copy, Default)]
pub struct TokenStats {
    /// -log p_model(target).
    pub nll: f64,
    /// -log p_ref(target), when there is a reference.
    pub ref_nll: f64,
    /// KL(ref || model).
    pub kl: f64,
    /// Whether both put the same token on top.
    pub same_top: bool,
    /// p_model(target) - p_ref(target).
    pub dp: f64,
}

/// Per-token results in stream order, plus the reference summaries to save.
pub struct Scored {
    /// One entry per scored token.
    pub tokens: Vec<TokenStats>,
    /// The reference (or, without one, the model) summarised per token, for --save-reference.
    pub summaries: Vec<RefToken>,
}

fn log_softmax_at(logits: &[f32], lse: f32, i: usize) -> f64 {
    (logits[i] - lse) as f64
}

fn argmax(x: &[f32]) -> usize {
    mixq_runtime::sample::argmax(x) as usize
}

/// Compares a model row with a full reference row.
pub(crate) fn compare_full(m: &[f32], r: &[f32], target: usize) -> TokenStats {
    let (lm, lr) = (log_sum_exp(m), log_sum_exp(r));
    let mut kl = 0.0;
    for (&a, &b) in r.iter().zip(m) {
        let lp = (a - lr) as f64;
        let lq = (b - lm) as f64;
        kl += lp.exp() * (lp - lq);
    }
    let (nll, ref_nll) = (-log_softmax_at(m, lm, target), -log_softmax_at(r, lr, target));
    TokenStats { nll, ref_nll, kl: kl.max(0.0), same_top: argmax(m) == argmax(r), dp: (-nll).exp() - (-ref_nll).exp() }
}

/// Compares a model row with a saved top-k reference: KL over the top k, plus the remaining mass
/// as one bucket.
fn compare_saved(m: &[f32], r: &RefToken) -> TokenStats {
    let lm = log_sum_exp(m);
    let (mut kl, mut pr_top, mut pm_top) = (0.0, 0.0, 0.0);
    for (&id, &logit) in r.top_ids.iter().zip(&r.top_logits) {
        let lp = (logit - r.lse) as f64;
        let lq = (m[id as usize] - lm) as f64;
        kl += lp.exp() * (lp - lq);
        pr_top += lp.exp();
        pm_top += lq.exp();
    }
    let (pr_tail, pm_tail) = ((1.0 - pr_top).max(0.0), (1.0 - pm_top).max(1e-30));
    if pr_tail > 1e-12 {
        kl += pr_tail * (pr_tail.ln() - pm_tail.ln());
    }
    let nll = -log_softmax_at(m, lm, r.target as usize);
    let ref_nll = -(r.target_logprob as f64);
    let same_top = r.top_ids.first().is_some_and(|&t| t as usize == argmax(m));
    TokenStats { nll, ref_nll, kl: kl.max(0.0), same_top, dp: (-nll).exp() - (-ref_nll).exp() }
}

/// Checks that every id a saved reference holds indexes this model's vocabulary: a reference saved
/// for another vocabulary is refused by name rather than read out of range.
fn check_saved_vocab(saved: &[RefToken], vocab: usize) -> Result<(), ValidateError> {
    let largest = saved.iter().flat_map(|r| r.top_ids.iter().chain([&r.target])).copied().max();
    match largest {
        Some(id) if id as usize >= vocab => {
            let at = saved.iter().position(|r| r.target == id || r.top_ids.contains(&id)).unwrap_or_default();
            Err(ValidateError::Reference(format!(
                "the saved reference logits were saved for a different vocabulary: scored token {at} names token id {id}, so the \
                 reference's vocabulary has at least {} tokens, but this model's has {vocab}",
                u64::from(id) + 1
            )))
        }
        _ => Ok(()),
    }
}

/// Scores every target of `tokens` under the sliding-window definition; `progress(scored, total)`
/// is called as windows finish. Windows run in parallel batches.
pub fn score(
    model: &Engine<'_>,
    tokens: &[u32],
    reference: &Reference<'_>,
    opts: EvalOptions,
    progress: &(dyn Fn(usize, usize) + Sync),
) -> Result<Scored, ValidateError> {
    let ws: Vec<Window> = windows(tokens.len(), opts.ctx, opts.stride);
    let total: usize = ws.iter().map(|w| w.end - w.score_from).sum();
    let vocab = model.config().vocab_size;
    if let Reference::Saved(saved) = reference {
        check_saved(saved, total, vocab)?;
    }
    let mut offsets = Vec::with_capacity(ws.len());
    let mut acc = 0;
    for w in &ws {
        offsets.push(acc);
        acc += w.end - w.score_from;
    }
    let done = std::sync::atomic::AtomicUsize::new(0);
    let one_window = |(w, offset): (&Window, usize)| -> Result<_, ValidateError> {
        let input = &tokens[w.begin..w.end];
        let logits = model.logits(input).map_err(ValidateError::Runtime)?;
        let ref_logits = match reference {
            Reference::Model(r) => Some(r.logits(input).map_err(ValidateError::Runtime)?),
            _ => None,
        };
        let mut stats = Vec::with_capacity(w.end - w.score_from);
        let mut summaries = Vec::with_capacity(w.end - w.score_from);
        for (k, t) in (w.score_from..w.end).enumerate() {
            // Logits at input position t-1 predict token t.
            let row = t - 1 - w.begin;
            let position = Position { logits: &logits[row * vocab..(row + 1) * vocab], target: tokens[t], saved_index: offset + k };
            let r = ref_logits.as_deref().map(|l| &l[row * vocab..(row + 1) * vocab]);
            stats.push(position.score(reference, r, opts.top_k, &mut summaries)?);
        }
        let n = done.fetch_add(stats.len(), std::sync::atomic::Ordering::Relaxed) + stats.len();
        progress(n, total);
        Ok((stats, summaries))
    };
    // CPU models score windows on parallel threads; a GPU runs one window at a time.
    let parallel = model.parallel() && !matches!(reference, Reference::Model(r) if !r.parallel());
    let per_window: Vec<(Vec<TokenStats>, Vec<RefToken>)> = if parallel {
        ws.par_iter().zip(offsets).map(one_window).collect::<Result<_, _>>()?
    } else {
        ws.iter().zip(offsets).map(one_window).collect::<Result<_, _>>()?
    };
    let mut tokens_out = Vec::with_capacity(total);
    let mut summaries = Vec::new();
    for (s, r) in per_window {
        tokens_out.extend(s);
        summaries.extend(r);
    }
    Ok(Scored { tokens: tokens_out, summaries })
}

/// Refuses a saved reference that does not fit these windows: another token count or vocabulary.
fn check_saved(saved: &[RefToken], total: usize, vocab: usize) -> Result<(), ValidateError> {
    if saved.len() != total {
        return Err(ValidateError::Reference(format!(
            "the saved reference scores {} tokens but these windows score {total}",
            saved.len()
        )));
    }
    check_saved_vocab(saved, vocab)
}

/// One scored position: the model's logits there, the token they predict, and its index among the
/// scored tokens (where a saved reference keeps it).
struct Position<'a> {
    logits: &'a [f32],
    target: u32,
    saved_index: usize,
}

impl Position<'_> {
    /// The position's figures against `reference` (`reference_logits`: a reference model's logits
    /// at the same position); records the reference summary to save where one is made.
    fn score(&self, reference: &Reference<'_>, reference_logits: Option<&[f32]>, top_k: usize, summaries: &mut Vec<RefToken>) -> Result<TokenStats, ValidateError> {
        let (m, target) = (self.logits, self.target);
        Ok(match (reference, reference_logits) {
            (Reference::Model(_), Some(r)) => {
                summaries.push(RefToken::from_logits(r, target, top_k));
                compare_full(m, r, target as usize)
            }
            (Reference::Saved(saved), _) => {
                let r = &saved[self.saved_index];
                if r.target != target {
                    return Err(ValidateError::Reference(format!(
                        "the saved reference was computed on other text: token {} differs",
                        self.saved_index
                    )));
                }
                compare_saved(m, r)
            }
            _ => {
                summaries.push(RefToken::from_logits(m, target, top_k));
                let lm = log_sum_exp(m);
                TokenStats { nll: -log_softmax_at(m, lm, target as usize), ..Default::default() }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identical_rows_have_zero_kl() {
        let row: Vec<f32> = (0..100).map(|i| (i as f32 * 0.7).cos() * 3.0).collect();
        let s = compare_full(&row, &row, 3);
        assert!(s.kl.abs() < 1e-12 && s.same_top && s.dp == 0.0);
        let saved = RefToken::from_logits(&row, 3, 10);
        let s2 = compare_saved(&row, &saved);
        assert!(s2.kl.abs() < 1e-9 && s2.same_top, "{}", s2.kl);
    }

    #[test]
    fn saved_ids_outside_the_vocabulary_are_refused() {
        let row: Vec<f32> = (0..100).map(|i| (i as f32 * 0.7).cos() * 3.0).collect();
        let ok = RefToken::from_logits(&row, 3, 10);
        assert!(check_saved_vocab(std::slice::from_ref(&ok), 100).is_ok());
        let mut wide = ok.clone();
        wide.top_ids[4] = 150;
        let e = check_saved_vocab(&[ok.clone(), wide], 100).unwrap_err().to_string();
        assert!(
            e.contains("saved for a different vocabulary: scored token 1 names token id 150")
                && e.contains("at least 151 tokens, but this model's has 100"),
            "{e}"
        );
        let mut target = ok;
        target.target = 100;
        assert!(check_saved_vocab(&[target], 100).unwrap_err().to_string().contains("token id 100"));
    }

    #[test]
    fn top_k_kl_approaches_exact_kl() {
        let r: Vec<f32> = (0..200).map(|i| (i as f32 * 0.37).sin() * 6.0).collect();
        let m: Vec<f32> = r.iter().enumerate().map(|(i, v)| v + (i as f32 * 1.3).cos() * 0.2).collect();
        let exact = compare_full(&m, &r, 5).kl;
        let approx = compare_saved(&m, &RefToken::from_logits(&r, 5, 64)).kl;
        assert!(approx <= exact * 1.0001 && approx > exact * 0.5, "{approx} vs {exact}");
    }
}
