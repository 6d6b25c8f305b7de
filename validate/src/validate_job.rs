//! The `validate` job: the text tokenized, the model (and a reference model or saved logits)
//! loaded, scored, the reference saved, the card updated, the gates checked.

use std::path::Path;

use mixq_loader::Checkpoint;
use mixq_runtime::Engine;

use crate::card::{section, update_card, CardContext};
use crate::reference::{self, RefHeader, RefToken};
use crate::{score, tokens_sha256, Corpus, EvalOptions, Gates, Reference, Summary, ValidateError};

/// What `validate` is asked for.
pub struct ValidateRequest<'a> {
    /// The model to measure.
    pub model: &'a Path,
    /// The text file.
    pub text: &'a Path,
    /// A reference checkpoint.
    pub reference: Option<&'a Path>,
    /// Saved reference logits instead.
    pub reference_logits: Option<&'a Path>,
    /// Where to save the reference's top-k logits.
    pub save_reference: Option<&'a Path>,
    /// Window length.
    pub ctx: usize,
    /// Advance between windows.
    pub stride: usize,
    /// Evaluate only the first N tokens.
    pub max_tokens: Option<usize>,
    /// Logits kept per token in a saved reference.
    pub top_k: usize,
    /// The publish gates.
    pub gates: Gates,
    /// A model card to add the validation section to.
    pub card: Option<&'a Path>,
}

/// The figures of a validation and the gates it failed.
pub struct Validation {
    /// PPL and, with a reference, the comparison.
    pub summary: Summary,
    /// One line per failed gate.
    pub failed: Vec<String>,
}

/// A model loader: opens a checkpoint on whatever backend the caller chose.
pub type Loader<'l, E> = dyn for<'c> Fn(&'c Checkpoint) -> Result<Engine<'c>, E> + 'l;

/// Checks that `ctx` and `stride` make windows.
pub fn check_windows(ctx: usize, stride: usize) -> Result<(), ValidateError> {
    if ctx < 2 || stride == 0 || stride > ctx {
        return Err(ValidateError::Input(format!(
            "--ctx must be at least 2 and --stride between 1 and --ctx (got ctx {ctx}, stride {stride})"
        )));
    }
    Ok(())
}

/// Reads saved reference logits and checks they were made on these tokens and windows.
pub fn read_saved_reference(path: &Path, tokens_sha: &str, ctx: usize, stride: usize) -> Result<Vec<RefToken>, ValidateError> {
    let (h, t) = reference::read(path)?;
    if h.tokens_sha256 != tokens_sha || h.ctx != ctx || h.stride != stride {
        return Err(ValidateError::Input(format!(
            "{}: saved for other text or windows (ctx {}, stride {}); this run has ctx {ctx}, stride {stride}",
            path.display(),
            h.ctx,
            h.stride
        )));
    }
    Ok(t)
}

/// Validates `r.model` on `r.text`, loading models with `load`; `progress(tokens_done, total)`.
pub fn validate_model<E: From<ValidateError>>(
    r: &ValidateRequest<'_>,
    load: &Loader<'_, E>,
    progress: &(dyn Fn(usize, usize) + Sync),
) -> Result<Validation, E> {
    check_windows(r.ctx, r.stride)?;
    let corpus = Corpus::read(r.model, r.text, r.max_tokens)?;
    let tokens = &corpus.tokens;
    let ckpt = Checkpoint::open(r.model).map_err(ValidateError::from)?;
    let model = load(&ckpt)?;
    if tokens.len() < 2 {
        return Err(ValidateError::Input(format!("{}: fewer than 2 tokens to evaluate", r.text.display())).into());
    }
    let tokens_sha = tokens_sha256(tokens);
    let ref_ckpt = r.reference.map(Checkpoint::open).transpose().map_err(ValidateError::from)?;
    let ref_model = ref_ckpt.as_ref().map(load).transpose()?;
    let saved = r.reference_logits.map(|p| read_saved_reference(p, &tokens_sha, r.ctx, r.stride)).transpose()?;
    let (reference, method) = match (&ref_model, &saved) {
        (Some(m), _) => (Reference::Model(m), Some("exact")),
        (None, Some(t)) => (Reference::Saved(t), Some("top-k")),
        _ => (Reference::None, None),
    };
    let opts = EvalOptions { ctx: r.ctx, stride: r.stride, top_k: r.top_k };
    let scored = score(&model, tokens, &reference, opts, progress)?;
    let summary = Summary::new(&scored.tokens, method);
    if let Some(p) = r.save_reference {
        if saved.is_some() {
            return Err(ValidateError::Input("--save-reference needs --reference DIR (or no reference), not --reference-logits".into()).into());
        }
        let model_name = r.reference.unwrap_or(r.model).display().to_string();
        let header = RefHeader { model: model_name, tokens_sha256: tokens_sha, ctx: r.ctx, stride: r.stride, top_k: r.top_k };
        reference::write(p, &header, &scored.summaries)?;
    }
    if let Some(card) = r.card {
        let name = r.text.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let reference_name = r.reference.or(r.reference_logits).map(|p| p.display().to_string());
        let ctx = CardContext { text_name: &name, text_sha256: &corpus.sha256, ctx: r.ctx, stride: r.stride, reference: reference_name.as_deref() };
        update_card(card, &section(&summary, &ctx))?;
    }
    let failed = r.gates.check(&summary);
    Ok(Validation { summary, failed })
}
