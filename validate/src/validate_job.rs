//! The `validate` job: the text tokenized, the model (and a reference model or saved logits)
//! loaded, scored, the reference saved, the card updated, the gates checked.

use std::path::Path;

use mixq_loader::Checkpoint;
use mixq_runtime::Engine;

use crate::card::{section, write_bench_rows, write_card_section, BenchRow, CardContext};
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
    /// Add this run's speed and peak memory to the card's "Speed and memory" table (`--card`,
    /// else MODEL/README.md).
    pub bench: bool,
}

impl ValidateRequest<'_> {
    /// The card `--bench` writes to: `--card`, else the model's own README.md.
    pub fn bench_card(&self) -> Option<std::path::PathBuf> {
        self.bench.then(|| self.card.map(Path::to_path_buf).unwrap_or_else(|| self.model.join("README.md")))
    }
}

/// The figures of a validation, the gates it failed and passed, and what it still has to write.
pub struct Validation {
    /// PPL and, with a reference, the comparison.
    pub summary: Summary,
    /// One line per failed gate.
    pub failed: Vec<String>,
    /// One line per passed gate.
    pub passed: Vec<String>,
    /// The reference summary for `--save-reference`, with its header.
    saved: Option<(RefHeader, Vec<RefToken>)>,
    /// The card section for `--card`.
    card_section: Option<String>,
    /// The "Speed and memory" row for `--bench`.
    bench_row: Option<BenchRow>,
}

/// A model loader: opens a checkpoint on whatever backend the caller chose.
pub type Loader<'l, E> = dyn for<'c> Fn(&'c Checkpoint) -> Result<Engine<'c>, E> + 'l;

/// The loader of the CPU reference (for callers without a backend choice).
pub fn load_on_cpu(ckpt: &Checkpoint) -> Result<Engine<'_>, ValidateError> {
    Ok(Engine::Cpu(mixq_runtime::Model::load(ckpt)?))
}

/// Checks that `ctx` and `stride` make windows.
pub fn check_windows(ctx: usize, stride: usize) -> Result<(), ValidateError> {
    if ctx < 2 || stride == 0 || stride > ctx {
        return Err(ValidateError::Input(format!(
            "--ctx must be at least 2 and --stride between 1 and --ctx (got ctx {ctx}, stride {stride})"
        )));
    }
    Ok(())
}

/// Checks an output file's path before any work: not a folder, and its folder exists.
fn check_output_path(flag: &str, path: &Path) -> Result<(), ValidateError> {
    if path.is_dir() {
        return Err(ValidateError::Input(format!("{}: {flag} names a folder; expected a file path", path.display())));
    }
    let parent = mixq_loader::file_name::folder_of(path);
    if !parent.is_dir() {
        return Err(ValidateError::Input(format!(
            "{}: {flag}'s folder {} does not exist; create it or pick another path",
            path.display(),
            parent.display()
        )));
    }
    Ok(())
}

/// Everything about the request that can be checked without reading a weight: windows, gates
/// and their reference, `--top-k`, the output paths.
pub fn check_request(r: &ValidateRequest<'_>) -> Result<(), ValidateError> {
    check_windows(r.ctx, r.stride)?;
    r.gates.check_ranges().map_err(ValidateError::Input)?;
    if r.gates.any() && r.reference.is_none() && r.reference_logits.is_none() {
        return Err(ValidateError::Input(
            "gates need a reference (--reference or --reference-logits): --max-kl, --max-ppl-ratio and --min-top1 compare with one; nothing was evaluated".into(),
        ));
    }
    if r.top_k == 0 {
        return Err(ValidateError::Input("--top-k 0: expected at least 1 logit kept per token".into()));
    }
    if let Some(p) = r.save_reference {
        if r.reference_logits.is_some() {
            return Err(ValidateError::Input("--save-reference needs --reference DIR (or no reference), not --reference-logits".into()));
        }
        check_output_path("--save-reference", p)?;
    }
    if let Some(card) = r.card {
        check_output_path("--card", card)?;
    }
    if let Some(card) = r.bench_card() {
        check_output_path("--bench", &card)?;
    }
    Ok(())
}

/// Reads saved reference logits and checks they were made on these tokens and windows, for a
/// model of `vocab` tokens.
pub fn read_saved_reference(path: &Path, tokens_sha: &str, ctx: usize, stride: usize, vocab: usize) -> Result<Vec<RefToken>, ValidateError> {
    let (h, t) = reference::read(path)?;
    let bad = |m: String| {
        let sep = if m.ends_with(", or") { " " } else { "; " };
        Err(ValidateError::Input(format!("{}: {m}{sep}save the reference again for this run", path.display())))
    };
    if let Some(v) = h.vocab.filter(|&v| v != vocab) {
        return bad(format!("saved for a model with a vocabulary of {v} tokens ({}), but this model's has {vocab}", h.model));
    }
    if h.ctx != ctx || h.stride != stride {
        return bad(format!(
            "saved with windows of {} tokens advancing by {}, but this run has --ctx {ctx} --stride {stride}; pass --ctx {} --stride {}, or",
            h.ctx, h.stride, h.ctx, h.stride
        ));
    }
    if h.tokens_sha256 != tokens_sha {
        return bad(format!(
            "saved for other text: its {} scored tokens came from another --text, --max-tokens or tokenizer (token sha256 {} here, {} in the file)",
            t.len(),
            &tokens_sha[..12.min(tokens_sha.len())],
            &h.tokens_sha256[..12.min(h.tokens_sha256.len())]
        ));
    }
    Ok(t)
}

/// Scored tokens of `n` tokens under the windows.
fn scored_count(n: usize, ctx: usize, stride: usize) -> usize {
    crate::windows::windows(n, ctx, stride).iter().map(|w| w.end - w.score_from).sum()
}

/// Sizes the `--save-reference` file before scoring and checks the filesystem can hold it.
fn check_reference_space(path: &Path, count: usize, top_k: usize, model: &str) -> Result<(), ValidateError> {
    let bytes = reference::file_bytes(count, top_k, model.len());
    let parent = mixq_loader::file_name::folder_of(path);
    let free = mixq_quantizer::writer::staging::free_bytes(parent).map_err(|e| ValidateError::Io(parent.to_path_buf(), e))?;
    let existing = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    if bytes > free.saturating_add(existing) {
        return Err(ValidateError::Input(format!(
            "{}: --save-reference needs {bytes} bytes ({count} scored tokens x top-k {top_k}), but the filesystem has {free} free; lower --top-k or --max-tokens",
            path.display()
        )));
    }
    Ok(())
}

/// Validates `r.model` on `r.text`, loading models with `load`; `progress(tokens_done, total)`.
/// Everything is checked before the first token is scored; nothing is written ([`Validation::save`]
/// writes the saved reference and the card).
pub fn validate_model<E: From<ValidateError>>(
    r: &ValidateRequest<'_>,
    load: &Loader<'_, E>,
    progress: &(dyn Fn(usize, usize) + Sync),
) -> Result<Validation, E> {
    check_request(r)?;
    let corpus = Corpus::read(r.model, r.text, r.max_tokens)?;
    let tokens = &corpus.tokens;
    if tokens.len() < 2 {
        return Err(ValidateError::Input(format!("{}: fewer than 2 tokens to evaluate", r.text.display())).into());
    }
    let ckpt = Checkpoint::open(r.model).map_err(ValidateError::from)?;
    let vocab = ckpt.config().vocab_size;
    // More logits than the vocabulary hold nothing: cap before sizing the file.
    let top_k = r.top_k.min(vocab);
    let ref_name = r.reference.unwrap_or(r.model).display().to_string();
    if let Some(p) = r.save_reference {
        check_reference_space(p, scored_count(tokens.len(), r.ctx, r.stride), top_k, &ref_name)?;
    }
    let tokens_sha = tokens_sha256(tokens);
    let saved = r.reference_logits.map(|p| read_saved_reference(p, &tokens_sha, r.ctx, r.stride, vocab)).transpose()?;
    let model = load(&ckpt)?;
    let ref_ckpt = r.reference.map(Checkpoint::open).transpose().map_err(ValidateError::from)?;
    let ref_model = ref_ckpt.as_ref().map(load).transpose()?;
    let (reference, method) = match (&ref_model, &saved) {
        (Some(m), _) => (Reference::Model(m), Some("exact")),
        (None, Some(t)) => (Reference::Saved(t), Some("top-k")),
        _ => (Reference::None, None),
    };
    let opts = EvalOptions { ctx: r.ctx, stride: r.stride, top_k };
    let start = std::time::Instant::now();
    let scored = score(&model, tokens, &reference, opts, progress)?;
    let seconds = start.elapsed().as_secs_f64();
    let summary = Summary::new(&scored.tokens, method);
    let bench_row = r.bench.then(|| BenchRow {
        measured: format!(
            "`mixq validate` (windows of {}{})",
            r.ctx,
            if ref_model.is_some() { ", with the reference model's time" } else { "" }
        ),
        device: model.describe(),
        tokens: summary.tokens,
        tokens_per_second: summary.tokens as f64 / seconds.max(1e-9),
        weight_bytes_per_second: None,
        peak_rss: mixq_runtime::jobs::peak_rss_bytes(),
        gpu_memory: model.gpu_memory_bytes() + ref_model.as_ref().map_or(0, |m| m.gpu_memory_bytes()),
    });
    let saved = r.save_reference.map(|_| {
        let header = RefHeader { model: ref_name, tokens_sha256: tokens_sha, ctx: r.ctx, stride: r.stride, top_k, vocab: Some(vocab) };
        (header, scored.summaries)
    });
    let card_section = r.card.map(|_| {
        let name = r.text.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let reference_name = r.reference.or(r.reference_logits).map(|p| p.display().to_string());
        let ctx = CardContext { text_name: &name, text_sha256: &corpus.sha256, ctx: r.ctx, stride: r.stride, reference: reference_name.as_deref() };
        section(&summary, &ctx)
    });
    let (failed, passed) = (r.gates.check(&summary), r.gates.passed(&summary));
    Ok(Validation { summary, failed, passed, saved, card_section, bench_row })
}

impl Validation {
    /// Writes what the request asked to keep: the saved reference, and the card's section (with
    /// the card's entry in its folder's `mixq-manifest.json` refreshed, so `mixq verify` still
    /// passes). Returns one line per file written.
    pub fn save(&self, r: &ValidateRequest<'_>) -> Result<Vec<String>, ValidateError> {
        let mut wrote = Vec::new();
        if let (Some(p), Some((header, tokens))) = (r.save_reference, &self.saved) {
            reference::write(p, header, tokens)?;
            wrote.push(format!("saved the reference's top-{} logits of {} tokens to {}", header.top_k, tokens.len(), p.display()));
        }
        if let (Some(card), Some(md)) = (r.card, &self.card_section) {
            let manifest = write_card_section(card, md)?;
            wrote.push(match manifest {
                Some(m) => format!("added the validation to {} and its entry in {}", card.display(), m.display()),
                None => format!("added the validation to {}", card.display()),
            });
        }
        if let (Some(card), Some(row)) = (r.bench_card(), &self.bench_row) {
            write_bench_rows(&card, "validate", std::slice::from_ref(row))?;
            wrote.push(format!("added this run's speed and memory to {}", card.display()));
        }
        Ok(wrote)
    }
}
