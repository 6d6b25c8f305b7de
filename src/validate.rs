//! `mixq validate`: loading the models and the text, progress, reference files, the card.

use std::path::Path;

use anyhow::{bail, Result};
use mixq_loader::Checkpoint;

/// Inputs of `mixq validate`.
pub struct ValidateArgs<'a> {
    pub model: &'a Path,
    pub text: &'a Path,
    pub reference: Option<&'a Path>,
    pub reference_logits: Option<&'a Path>,
    pub save_reference: Option<&'a Path>,
    pub ctx: usize,
    pub stride: usize,
    pub max_tokens: Option<usize>,
    pub top_k: usize,
    pub gates: mixq_validate::Gates,
    pub card: Option<&'a Path>,
    pub backend: crate::backend::BackendArgs,
    pub quiet: bool,
}

/// Runs a validation: returns the figures and the failed gates.
pub fn validate(a: &ValidateArgs<'_>) -> Result<(mixq_validate::Summary, Vec<String>)> {
    use mixq_validate::reference::{self, RefHeader};
    if a.ctx < 2 || a.stride == 0 || a.stride > a.ctx {
        bail!("--ctx must be at least 2 and --stride between 1 and --ctx (got ctx {}, stride {})", a.ctx, a.stride);
    }
    let corpus = mixq_validate::Corpus::read(a.model, a.text, a.max_tokens)?;
    let tokens = &corpus.tokens;
    let ckpt = Checkpoint::open(a.model)?;
    let model = crate::backend::load(&ckpt, &a.backend, a.quiet)?;
    if tokens.len() < 2 {
        bail!("{}: fewer than 2 tokens to evaluate", a.text.display());
    }
    let tokens_sha = mixq_validate::tokens_sha256(tokens);
    let opts = mixq_validate::EvalOptions { ctx: a.ctx, stride: a.stride, top_k: a.top_k };
    let ref_ckpt = a.reference.map(Checkpoint::open).transpose()?;
    let ref_model = ref_ckpt.as_ref().map(|c| crate::backend::load(c, &a.backend, a.quiet)).transpose()?;
    let saved = match a.reference_logits {
        Some(p) => {
            let (h, t) = reference::read(p)?;
            if h.tokens_sha256 != tokens_sha || h.ctx != a.ctx || h.stride != a.stride {
                bail!(
                    "{}: saved for other text or windows (ctx {}, stride {}); this run has ctx {}, stride {}",
                    p.display(),
                    h.ctx,
                    h.stride,
                    a.ctx,
                    a.stride
                );
            }
            Some(t)
        }
        None => None,
    };
    let reference = match (&ref_model, &saved) {
        (Some(m), _) => mixq_validate::Reference::Model(m),
        (None, Some(t)) => mixq_validate::Reference::Saved(t),
        _ => mixq_validate::Reference::None,
    };
    let progress = crate::progress::CountProgress::new("validate", "tokens", a.quiet);
    let scored = mixq_validate::score(&model, tokens, &reference, opts, &|done, total| progress.update(done, total))?;
    progress.finish();
    let method = match reference {
        mixq_validate::Reference::Model(_) => Some("exact"),
        mixq_validate::Reference::Saved(_) => Some("top-k"),
        mixq_validate::Reference::None => None,
    };
    let summary = mixq_validate::Summary::new(&scored.tokens, method);
    if let Some(p) = a.save_reference {
        if saved.is_some() {
            bail!("--save-reference needs --reference DIR (or no reference), not --reference-logits");
        }
        let header = RefHeader {
            model: a.reference.unwrap_or(a.model).display().to_string(),
            tokens_sha256: tokens_sha.clone(),
            ctx: a.ctx,
            stride: a.stride,
            top_k: a.top_k,
        };
        reference::write(p, &header, &scored.summaries)?;
    }
    if let Some(card) = a.card {
        let name = a.text.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let reference_name = a.reference.or(a.reference_logits).map(|p| p.display().to_string());
        let ctx = mixq_validate::card::CardContext {
            text_name: &name,
            text_sha256: &corpus.sha256,
            ctx: a.ctx,
            stride: a.stride,
            reference: reference_name.as_deref(),
        };
        mixq_validate::card::update_card(card, &mixq_validate::card::section(&summary, &ctx))?;
    }
    let failed = a.gates.check(&summary);
    Ok((summary, failed))
}
